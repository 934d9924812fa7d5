"""tools/sweep.py: spec expansion, the runs.txt contract of slurm/sweep.sh, and collecting results."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sweep_tool", ROOT / "tools" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
sys.modules["sweep_tool"] = sweep
_spec.loader.exec_module(sweep)

SPEC = {
    "base": "examples/tiny_cpu.yaml",
    "overrides": {"wandb_mode": "disabled", "rl.steps": 20},
    "arms": {"grpo": {"scope.enabled": False}, "scope": {"scope.method": "scope"}},
    "grid": {"rl.lr": [0.0001, 1e-05]},
    "seeds": [1, 2],
}


def test_expand_names_overrides_count():
    runs = sweep.expand(SPEC, root=ROOT)
    assert len(runs) == 2 * 2 * 2
    assert [r.name for r in runs] == [
        "grpo-lr0.0001-s1", "grpo-lr0.0001-s2", "grpo-lr0.00001-s1", "grpo-lr0.00001-s2",
        "scope-lr0.0001-s1", "scope-lr0.0001-s2", "scope-lr0.00001-s1", "scope-lr0.00001-s2",
    ]  # fmt: skip
    r = runs[2]
    assert r.config == str(ROOT / "examples" / "tiny_cpu.yaml")
    # fixed, arm, grid, seed: in that order, floats never in 1e-5 form
    assert r.overrides == [
        "wandb_mode=disabled",
        "rl.steps=20",
        "scope.enabled=false",
        "rl.lr=0.00001",
        "seed=1",
    ]
    assert r.point == "grpo-lr0.00001" and r.seed == 1 and r.arm == "grpo"


def test_expand_without_arms_grid_seeds_and_list_overrides():
    runs = sweep.expand({"base": "/abs/c.yaml", "overrides": ["optim.lr=0.001", "x.y=a b"]})
    assert [(r.name, r.config, r.overrides) for r in runs] == [
        ("run", "/abs/c.yaml", ["optim.lr=0.001", "x.y=a b"])
    ]
    runs = sweep.expand({"base": "/abs/c.yaml", "seeds": [7, 8]})
    assert [r.name for r in runs] == ["run-s7", "run-s8"] and runs[1].overrides == ["seed=8"]


@pytest.mark.parametrize(
    "bad",
    [
        {"base": "c.yaml", "arms": {"bad name": {}}},
        {"base": "c.yaml", "grid": {"a.b": []}},
        {"base": "c.yaml", "seeds": ["x"]},
        {"base": "c.yaml", "overrides": {"a": "tab\there"}},
        {"base": "c.yaml", "arms": {"a": {}}, "grid": {"k": [1, "1"]}},  # duplicate names a-k1
    ],
)
def test_expand_rejects(bad):
    with pytest.raises(sweep.SpecError):
        sweep.expand(bad, root=ROOT)


def test_format_value():
    assert sweep.format_value(1e-6) == "0.000001"
    assert sweep.format_value(3.0e-3) == "0.003"
    assert sweep.format_value(1e20) == "100000000000000000000.0"
    assert sweep.format_value(True) == "true" and sweep.format_value(None) == "null"
    assert sweep.format_value([1, 2]) == "[1, 2]"


def test_runs_txt_contract(tmp_path):
    runs = sweep.write_sweep(SPEC, tmp_path, root=ROOT)
    raw = (tmp_path / "runs.txt").read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n") and "\r" not in text
    lines = text.split("\n")[:-1]
    assert len(lines) == len(runs)  # no header, no blank lines: line i+1 is array task i
    names = []
    for line, run in zip(lines, runs):
        fields = line.split("\t")
        assert all(fields) and "" not in fields  # exactly one TAB between non-empty fields
        name, config, *over = fields
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
        assert Path(config).is_absolute() and Path(config).is_file()
        assert all(re.fullmatch(r"[A-Za-z_][\w.]*=.+", o) for o in over)
        assert not any(o.startswith("run_dir=") for o in over)  # slurm/sweep.sh picks SWEEP_DIR/runs/NAME
        assert (name, config, over) == (run.name, run.config, run.overrides)
        names.append(name)
    assert len(set(names)) == len(names)
    # the manifest round-trips
    assert [r.name for r in sweep.read_runs(tmp_path)] == names


def test_runs_txt_parsed_by_slurm_common(tmp_path):
    """slurm/common.sh's own validator accepts the file (line 2 -> task 1)."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    sweep.write_sweep(SPEC, tmp_path, root=ROOT)
    script = (
        f"source {ROOT}/slurm/common.sh; sm_parse_runs_line {tmp_path}/runs.txt 1 || exit 9; "
        'printf "%s\\n" "$SM_RUNS_COUNT" "${SM_RUN_FIELDS[@]}"'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    if out.returncode != 0 and "sm_parse_runs_line" in out.stderr and "not found" in out.stderr:
        pytest.skip("slurm/common.sh has no sm_parse_runs_line")
    assert out.returncode == 0, out.stderr
    fields = out.stdout.splitlines()
    assert fields[0] == "8" and fields[1] == "grpo-lr0.0001-s2"


def _write_metrics(run_dir: Path, lines: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def test_collect_mean_std(tmp_path):
    spec = {"base": "/abs/c.yaml", "arms": {"grpo": {}, "scope": {}}, "seeds": [1, 2, 3]}
    sweep.write_sweep(spec, tmp_path)
    finals = {"grpo": [0.2, 0.4, 0.6], "scope": [0.5, 0.5, 0.8]}
    for arm, accs in finals.items():
        for seed, acc in zip([1, 2, 3], accs):
            if arm == "scope" and seed == 3:
                acc = 0.8
            _write_metrics(
                tmp_path / "runs" / f"{arm}-s{seed}",
                [
                    {"stage": "rl", "step": 0, "eval/greedy_acc": 0.1 * seed, "eval/pass@8": 0.5},
                    {"stage": "rl", "step": 1, "reward": 0.3},
                    {"stage": "rl", "step": 5, "eval/greedy_acc": 0.0, "eval/pass@8": 0.0},  # not the last
                    {"stage": "rl", "step": 10, "eval/greedy_acc": acc, "eval/pass@8": 1.0},
                    {"stage": "rl", "step": 10, "reward": 0.9},  # a training line after it is ignored
                ],
            )
    (tmp_path / "runs" / "grpo-s1" / "sweep_run.json").write_text(json.dumps({"wall_s": 100.0}))
    rows = sweep.collect(tmp_path)
    by = {(r["point"], r["when"]): r for r in rows}
    assert [(r["point"], r["when"]) for r in rows] == [
        ("grpo", "initial"), ("scope", "initial"), ("grpo", "final"), ("scope", "final")
    ]  # fmt: skip
    g = by[("grpo", "final")]
    assert g["n"] == 3 and g["step"] == "10" and g["seeds"] == "1 2 3"
    assert g["eval/greedy_acc_mean"] == pytest.approx(0.4)
    assert g["eval/greedy_acc_std"] == pytest.approx(0.2)  # sqrt(((.2)^2 + 0 + (.2)^2) / 2)
    assert g["eval/pass@8_mean"] == 1.0 and g["eval/pass@8_std"] == 0.0
    s = by[("scope", "final")]
    assert s["eval/greedy_acc_mean"] == pytest.approx(0.6)
    assert s["eval/greedy_acc_std"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.04) / 2))
    i = by[("grpo", "initial")]
    assert i["step"] == "0" and i["eval/greedy_acc_mean"] == pytest.approx(0.2)
    assert i["eval/greedy_acc_std"] == pytest.approx(0.1)
    assert g["wall_s_mean"] == 100.0 and math.isnan(g["wall_s_std"])  # one value: no std

    md = (tmp_path / "results.md").read_text()
    assert "| grpo | final | 3 | 10 | 0.400 ± 0.200 | 1.000 ± 0.000 | 100 |" in md
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert float(table[2]["eval/greedy_acc_mean"]) == pytest.approx(0.4)
    assert float(table[3]["eval/greedy_acc_std"]) == pytest.approx(0.1732051, rel=1e-5)


def test_collect_from_runs_txt_only(tmp_path):
    (tmp_path / "runs.txt").write_text("a-s1\t/c.yaml\tseed=1\na-s2\t/c.yaml\tseed=2\n")
    for s, acc in ((1, 0.25), (2, 0.75)):
        _write_metrics(tmp_path / "runs" / f"a-s{s}", [{"stage": "rl", "step": 3, "eval/avg@8": acc}])
    rows = sweep.collect(tmp_path)
    final = [r for r in rows if r["when"] == "final"]
    assert len(final) == 1 and final[0]["point"] == "a" and final[0]["n"] == 2
    assert final[0]["eval/avg@8_mean"] == 0.5
    assert final[0]["eval/avg@8_std"] == pytest.approx(math.sqrt(0.125))


def test_is_finished(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rl:\n  steps: 40\n")
    run = sweep.expand({"base": str(cfg), "overrides": {"rl.steps": 3}})[0]
    assert not sweep.is_finished(run, tmp_path, "train")
    rd = tmp_path / "runs" / "run"
    _write_metrics(rd, [{"stage": "rl", "step": 3, "eval/greedy_acc": 0.5}])
    (rd / "checkpoints_rl").mkdir()
    (rd / "checkpoints_rl" / "latest").write_text("step_00000002")
    assert not sweep.is_finished(run, tmp_path, "train")
    (rd / "checkpoints_rl" / "latest").write_text("step_00000003")
    assert sweep.is_finished(run, tmp_path, "train")


def test_command_line_overrides_come_after_fixed(tmp_path):
    assert (
        sweep.main(["expand", str(_spec_file(tmp_path)), "--out", str(tmp_path / "sw"), "rl.steps=80"]) == 0
    )
    line = (tmp_path / "sw" / "runs.txt").read_text().splitlines()[0].split("\t")
    assert line[2:] == ["wandb_mode=disabled", "rl.steps=20", "rl.steps=80", "scope.enabled=false", "seed=1"]


def _spec_file(tmp_path: Path) -> Path:
    import yaml

    p = tmp_path / "spec.yaml"
    spec = {**SPEC, "base": str(ROOT / "examples" / "tiny_cpu.yaml"), "grid": {}, "seeds": [1]}
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


def test_collect_paired_baseline(tmp_path):
    sweep.write_sweep(
        {"base": "/abs/c.yaml", "arms": {"grpo": {}, "scope": {}}, "seeds": [1, 2, 3]}, tmp_path
    )
    accs = {"grpo": [0.1, 0.3, 0.2], "scope": [0.2, 0.3, 0.5]}  # differences 0.1, 0.0, 0.3
    for arm, xs in accs.items():
        for seed, acc in zip([1, 2, 3], xs):
            _write_metrics(
                tmp_path / "runs" / f"{arm}-s{seed}", [{"stage": "rl", "step": 4, "eval/greedy_acc": acc}]
            )
    rows = sweep.collect(tmp_path, baseline="grpo")
    delta = [r for r in rows if r["when"] == "final - grpo"]
    assert [r["point"] for r in delta] == ["scope"] and delta[0]["n"] == 3
    assert delta[0]["eval/greedy_acc_mean"] == pytest.approx(0.4 / 3)
    assert delta[0]["eval/greedy_acc_std"] == pytest.approx(
        math.sqrt(((0.1 - 0.4 / 3) ** 2 + (0.4 / 3) ** 2 + (0.3 - 0.4 / 3) ** 2) / 2)
    )
    with pytest.raises(sweep.SpecError):
        sweep.collect(tmp_path, baseline="nope")


def test_training_table_means_and_first_error_histogram(tmp_path):
    spec = {"base": "/abs/c.yaml", "arms": {"scope": {}}, "seeds": [1, 2]}
    sweep.write_sweep(spec, tmp_path)
    step = lambda acc, salvage, e0, e1: {
        "stage": "rl", "loss": 0.0, "rollout/accuracy": acc, "scope/salvage_rate_failed": salvage,
        "dynamic/kept_frac": 1.0, "scope/first_error/0": e0, "scope/first_error/1": e1,
    }  # fmt: skip
    _write_metrics(tmp_path / "runs" / "scope-s1", [step(0.1, 0.2, 3, 1), step(0.3, 0.4, 1, 1)])
    _write_metrics(tmp_path / "runs" / "scope-s2", [step(0.2, 0.3, 2, 0), {"stage": "rl", "step": 2, "x": 1}])
    lines = sweep.training_table(tmp_path)
    assert lines[2] == (
        "| point | n | accuracy | salvage_rate_failed | kept_frac | first_error@0 | first_error@1 |"
    )
    # run 1: accuracy 0.2, salvage 0.3, first errors pooled: 4 of 6 at step 0 (per-step means would
    # give 0.625); run 2: 0.2, 0.3, 2 of 2 at step 0
    want = "| scope | 2 | 0.200 ± 0.000 | 0.300 ± 0.000 | 1.000 ± 0.000 | 0.833 ± 0.236 | 0.167 ± 0.236 |"
    assert lines[4] == want
