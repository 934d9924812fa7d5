"""Sweeps: expand a spec into runs, run them locally (resumable), collect their final metrics.

    python tools/sweep.py expand SPEC --out DIR [k=v ...]  # DIR/runs.txt (+ DIR/sweep.json)
    sbatch --array=0-$(($(wc -l < DIR/runs.txt) - 1)) slurm/sweep.sh DIR   # ... on Slurm, or:
    python tools/sweep.py run SPEC --out DIR [--stage train] [--jobs 1] [k=v ...]  # locally, in turn
    python tools/sweep.py collect DIR                       # DIR/results.md and DIR/results.csv

Spec (YAML; paths relative to the current directory, written absolute into runs.txt):

    base: examples/tiny_cpu.yaml        # config every run starts from
    stage: train                        # default stage for `run` (--stage wins); sft|train
    overrides: {wandb_mode: disabled}   # fixed overrides (mapping or list of "k=v"), applied first
    arms:                               # optional named arms: settings that are not a clean grid
      grpo: {scope.enabled: false}
      scope: {scope.method: scope}
    grid: {rl.lr: [0.0001, 0.0003]}     # optional: every combination of the listed values
    seeds: [1, 2, 3]                    # optional: each point runs once per seed (`seed=N` override)
    copy_tokenizer_from: runs/sft/tokenizer   # optional, `run` only: copy this tokenizer directory
                                        # into each run dir before starting (RL runs that
                                        # initialise from a shared SFT checkpoint need its tokenizer)

Runs = arms x grid points x seeds, named `ARM[-KEYVALUE...][-sSEED]` (KEY = last component of the
dotted key), e.g. `scope-lr0.0003-s2`. A run's overrides are: fixed (the spec's, then the `k=v`
arguments of expand/run), arm, grid, `seed=N`, in that order (later wins). runs.txt follows the
contract in docs/slurm.md ("Sweeps"): one run per line, `NAME<TAB>/abs/config<TAB>key=value...`,
no header; runs write to DIR/runs/NAME. `run` executes them seed-major (every point at the first
seed, then the next seed), passes the same overrides plus `run_dir=DIR/runs/NAME` to
`python -m scope_mega.cli STAGE`, skips runs that already finished (final checkpoint and final eval
line present) and writes each run's wall time to DIR/runs/NAME/sweep_run.json (its output goes to
DIR/runs/NAME/sweep_run.log). `collect` groups runs by everything but the seed ("point"), takes each
run's last eval line (and its first one, the before-training reference), and writes mean and sample
standard deviation (n-1) over seeds.

Whether a run finished is read through the package: its run layout (`scope_mega.run_dir`) and its
overrides applied as the CLI applies them (`scope_mega.config.apply_overrides`).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scope_mega.config import ConfigError, apply_overrides
from scope_mega.logging import read_metrics
from scope_mega.run_dir import LATEST, RL_CHECKPOINTS, SFT_CHECKPOINTS, step_name

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# stage -> (checkpoint directory inside the run dir, config key holding the number of steps, metrics stage)
STAGES = {"train": (RL_CHECKPOINTS, "rl.steps", "rl"), "sft": (SFT_CHECKPOINTS, "sft.steps", "sft")}
# eval metrics shown first in the tables (the rest follow alphabetically)
PREFERRED = ["eval/greedy_acc", "eval/avg@8", "eval/pass@8", "eval/distinct_paths", "eval/distinct_4gram",
             "eval/distinct_answers"]  # fmt: skip


class SpecError(ValueError):
    pass


@dataclass
class Run:
    name: str
    config: str  # absolute path
    overrides: list[str]
    point: str  # the run's name without the seed: runs of one point differ only by seed
    arm: str | None = None
    grid: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None


# ----------------------------------------------------------------------------- expansion
def format_value(v: Any) -> str:
    """A value as the scope-mega command line reads it (YAML): floats never in `1e-3` form."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            raise SpecError(f"value {v} cannot be written as an override")
        s = repr(v)
        if "e" in s or "E" in s:
            s = f"{v:.20f}".rstrip("0")
            s = s + "0" if s.endswith(".") else s
        return s
    if isinstance(v, (list, dict)):
        return json.dumps(v)  # JSON is YAML flow style
    return str(v)


def _override_items(obj: Any, where: str) -> list[tuple[str, Any]]:
    """A mapping {key: value} or a list of "key=value" strings -> [(key, value)]."""
    if obj is None:
        return []
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, list):
        out = []
        for item in obj:
            if not isinstance(item, str) or "=" not in item:
                raise SpecError(f"{where}: {item!r} is not a key=value string")
            k, raw = item.split("=", 1)
            out.append((k, yaml.safe_load(raw)))
        return out
    raise SpecError(f"{where} must be a mapping or a list of key=value strings")


def _override(key: str, value: Any) -> str:
    text = f"{key}={format_value(value)}"
    if not key or "\t" in text or "\n" in text or "\r" in text:
        raise SpecError(f"override {text!r}: empty key, TAB or newline not allowed")
    return text


def _name_part(key: str, value: Any) -> str:
    short = key.split(".")[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{short}{format_value(value)}")


def load_spec(path: str | Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: the spec must be a mapping")
    unknown = set(spec) - {
        "base",
        "stage",
        "overrides",
        "arms",
        "grid",
        "seeds",
        "copy_tokenizer_from",
        "name",
    }
    if unknown:
        raise SpecError(f"{path}: unknown spec keys {sorted(unknown)}")
    if "base" not in spec:
        raise SpecError(f"{path}: `base` (the config every run starts from) is required")
    return spec


def with_overrides(spec: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The spec with command-line `key=value`s appended to its fixed overrides (before arms/grid/seed)."""
    if not extra:
        return spec
    fixed = [_override(k, v) for k, v in _override_items(spec.get("overrides"), "overrides")]
    return {**spec, "overrides": fixed + list(extra)}


def expand(spec: dict[str, Any], root: Path | None = None) -> list[Run]:
    """All runs of a spec, in order arms x grid x seeds (seeds fastest)."""
    root = Path.cwd() if root is None else Path(root)
    base = Path(spec["base"])
    config = str((base if base.is_absolute() else root / base).resolve())
    fixed = [_override(k, v) for k, v in _override_items(spec.get("overrides"), "overrides")]
    arms = spec.get("arms") or {None: {}}
    if not isinstance(arms, dict):
        raise SpecError("arms must be a mapping name -> overrides")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise SpecError("grid must map each config key to a non-empty list of values")
    seeds = spec.get("seeds") or [None]
    if not isinstance(seeds, list) or any(
        s is not None and (not isinstance(s, int) or isinstance(s, bool)) for s in seeds
    ):
        raise SpecError("seeds must be a list of integers")
    runs: list[Run] = []
    keys = list(grid)
    for arm, arm_over in arms.items():
        if arm is not None and not NAME_RE.fullmatch(str(arm)):
            raise SpecError(f"arm name {arm!r} must match {NAME_RE.pattern}")
        arm_items = [_override(k, v) for k, v in _override_items(arm_over, f"arms.{arm}")]
        for values in itertools.product(*(grid[k] for k in keys)):
            point_parts = ([str(arm)] if arm is not None else []) + [
                _name_part(k, v) for k, v in zip(keys, values)
            ]
            point = "-".join(point_parts) or "run"
            grid_items = [_override(k, v) for k, v in zip(keys, values)]
            for seed in seeds:
                name = point if seed is None else f"{point}-s{seed}"
                over = fixed + arm_items + grid_items + ([] if seed is None else [f"seed={seed}"])
                runs.append(Run(name, config, over, point, arm, dict(zip(keys, values)), seed))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"run names are not unique: {dup}")
    for n in names:
        if not NAME_RE.fullmatch(n):
            raise SpecError(f"run name {n!r} must match {NAME_RE.pattern}")
    return runs


def runs_txt(runs: list[Run]) -> str:
    """runs.txt, version 1 of the contract in docs/slurm.md."""
    lines = []
    for r in runs:
        fields = [r.name, r.config, *r.overrides]
        assert all(f and "\t" not in f and "\n" not in f for f in fields), fields
        lines.append("\t".join(fields) + "\n")
    return "".join(lines)


def write_sweep(spec: dict[str, Any], out: Path, root: Path | None = None) -> list[Run]:
    runs = expand(spec, root)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs.txt").write_text(runs_txt(runs), encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps({"spec": spec, "runs": [asdict(r) for r in runs]}, indent=1))
    return runs


# ----------------------------------------------------------------------------- local runs
def run_dir_of(run: Run, out: Path) -> Path:
    for o in run.overrides:
        if o.startswith("run_dir="):
            return Path(o.split("=", 1)[1])
    return out / "runs" / run.name


def _resolved(config: str, overrides: list[str], dotted: str) -> Any:
    """The value of `dotted` in a run's config file with its overrides applied as the CLI applies
    them; None where it is unset or the overrides do not apply (the run's own start reports that)."""
    data = yaml.safe_load(Path(config).read_text()) or {}
    try:
        data = apply_overrides(data, list(overrides))
    except ConfigError:
        return None
    node = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def is_finished(run: Run, out: Path, stage: str) -> bool:
    """The final checkpoint is at the configured last step and the metrics hold its eval line."""
    ckpt_dir, steps_key, mstage = STAGES[stage]
    rd = run_dir_of(run, out)
    steps = _resolved(run.config, run.overrides, steps_key)
    marker = rd / ckpt_dir / LATEST
    if steps is None or not marker.is_file() or marker.read_text().strip() != step_name(int(steps)):
        return False
    if stage != "train":
        return True
    return any(
        m.get("stage") == mstage and m.get("step") == steps and _eval_keys(m) for m in read_metrics(rd)
    )


def run_one(run: Run, out: Path, stage: str, tokenizer_from: Path | None, python: str) -> dict[str, Any]:
    rd = run_dir_of(run, out)
    if is_finished(run, out, stage):
        print(f"[sweep] {run.name}: finished already, skipped", flush=True)
        return {"name": run.name, "status": "skipped"}
    rd.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None and not (rd / "tokenizer" / "tokenizer.model").is_file():
        if not (tokenizer_from / "tokenizer.model").is_file():
            raise SpecError(f"copy_tokenizer_from: {tokenizer_from}/tokenizer.model does not exist")
        shutil.copytree(tokenizer_from, rd / "tokenizer", dirs_exist_ok=True)
    over = list(run.overrides)
    if not any(o.startswith("run_dir=") for o in over):
        over.append(f"run_dir={rd}")
    cmd = [python, "-m", "scope_mega.cli", stage, run.config, *over]
    print(f"[sweep] {run.name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(rd / "sweep_run.log", "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t0
    info = {"name": run.name, "status": "ok" if rc == 0 else f"failed rc={rc}", "wall_s": round(wall, 1),
            "command": cmd}  # fmt: skip
    (rd / "sweep_run.json").write_text(json.dumps(info, indent=1))
    print(f"[sweep] {run.name}: {info['status']} in {wall:.0f} s", flush=True)
    return info


def run_all(
    spec: dict[str, Any], out: Path, stage: str | None, jobs: int = 1, python: str = sys.executable
) -> int:
    stage = stage or spec.get("stage") or "train"
    if stage not in STAGES:
        raise SpecError(f"stage {stage!r}: one of {sorted(STAGES)}")
    runs = write_sweep(spec, out)
    tok = spec.get("copy_tokenizer_from")
    tok = Path(tok).resolve() if tok else None
    t0 = time.time()
    # seed-major order: a sweep stopped part-way has every arm/grid point at the same seeds
    seed_rank = {s: i for i, s in enumerate(dict.fromkeys(r.seed for r in runs))}
    ordered = sorted(runs, key=lambda r: seed_rank[r.seed])  # stable: points keep their order
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(lambda r: run_one(r, out, stage, tok, python), ordered))
    failed = [r["name"] for r in results if r["status"].startswith("failed")]
    print(f"[sweep] {len(runs)} runs, {len(failed)} failed, {time.time() - t0:.0f} s wall", flush=True)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- collecting
def _eval_keys(m: dict[str, Any]) -> list[str]:
    return [k for k in m if k.startswith("eval/")]


def read_runs(out: Path) -> list[Run]:
    """The runs of a sweep directory: sweep.json if present, else runs.txt (point = name minus -sN)."""
    manifest = out / "sweep.json"
    if manifest.is_file():
        return [Run(**r) for r in json.loads(manifest.read_text())["runs"]]
    runs = []
    for line in (out / "runs.txt").read_text(encoding="utf-8").splitlines():
        name, config, *over = line.split("\t")
        seed = next((int(o.split("=", 1)[1]) for o in over if o.startswith("seed=")), None)
        point = re.sub(r"-s\d+$", "", name) if seed is not None else name
        runs.append(Run(name, config, over, point, seed=seed))
    return runs


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; nan for a single value)."""
    n = len(xs)
    mu = sum(xs) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return mu, sd


def collect(out: Path, stage: str = "rl", baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per (point, when): `final` = each run's last eval line, `initial` = its first one.

    With `baseline` (a point, e.g. `grpo`): also one `final - BASELINE` row per other point, the mean
    and std over seeds of the per-seed difference (paired: runs of one seed share eval set and start).
    """
    runs = read_runs(out)
    per: dict[tuple[str, str], list[tuple[Run, dict[str, Any]]]] = {}
    missing = []
    for r in runs:
        rd = run_dir_of(r, out)
        evals = [m for m in read_metrics(rd) if m.get("stage", stage) == stage and _eval_keys(m)]
        if not evals:
            missing.append(r.name)
            continue
        wall = None
        info = rd / "sweep_run.json"
        if info.is_file():
            wall = json.loads(info.read_text()).get("wall_s")
        per.setdefault((r.point, "initial"), []).append((r, {**evals[0], "wall_s": None}))
        per.setdefault((r.point, "final"), []).append((r, {**evals[-1], "wall_s": wall}))
    if missing:
        print(f"[sweep] no eval lines yet for: {', '.join(missing)}", file=sys.stderr)
    keys = sorted({k for lst in per.values() for _, m in lst for k in _eval_keys(m)})
    keys = [k for k in PREFERRED if k in keys] + [k for k in keys if k not in PREFERRED]
    order = {r.point: i for i, r in reversed(list(enumerate(runs)))}
    rows = []
    for point, when in sorted(per, key=lambda pw: (pw[1] != "initial", order[pw[0]])):
        lst = per[(point, when)]
        row: dict[str, Any] = {
            "point": point,
            "when": when,
            "n": len(lst),
            "seeds": " ".join(str(r.seed) for r, _ in lst),
            "step": " ".join(sorted({str(m.get("step")) for _, m in lst})),
        }
        for k in keys + ["wall_s"]:
            xs = [float(m[k]) for _, m in lst if m.get(k) is not None]
            if xs:
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std(xs)
        rows.append(row)
    if baseline is not None:
        if (baseline, "final") not in per:
            raise SpecError(f"baseline {baseline!r} is not a point of {out} with results")
        base = {r.seed: m for r, m in per[(baseline, "final")]}
        for point in sorted({p for p, _ in per if p != baseline}, key=order.get):
            pairs = [(r, m, base[r.seed]) for r, m in per.get((point, "final"), []) if r.seed in base]
            if not pairs:
                continue
            row = {
                "point": point,
                "when": f"final - {baseline}",
                "n": len(pairs),
                "seeds": " ".join(str(r.seed) for r, _, _ in pairs),
                "step": " ".join(sorted({str(m.get("step")) for _, m, _ in pairs})),
            }
            for k in keys:
                xs = [
                    float(m[k]) - float(b[k])
                    for _, m, b in pairs
                    if m.get(k) is not None and b.get(k) is not None
                ]
                if xs:
                    row[f"{k}_mean"], row[f"{k}_std"] = mean_std(xs)
            rows.append(row)
    _write_tables(out, rows, keys, stage)
    return rows


TRAINING = ["rollout/accuracy", "scope/salvage_rate_failed", "dynamic/kept_frac"]
FIRST_ERROR = "scope/first_error/"


def training_table(out: Path, stage: str = "rl") -> list[str]:
    """Markdown lines: per point, mean ± std over seeds of each run's mean over its training steps of
    `TRAINING`, and its first-error histogram: the fraction of the failed rollouts (pooled over the
    run's steps) whose first wrong step is step k, from the PRM's `scope/first_error/k` counts."""
    per: dict[str, list[dict[str, float]]] = {}
    for r in read_runs(out):
        steps = [
            m for m in read_metrics(run_dir_of(r, out)) if m.get("stage", stage) == stage and "loss" in m
        ]
        if not steps:
            continue
        values = {k: sum(m[k] for m in steps) / len(steps) for k in TRAINING if all(k in m for m in steps)}
        hist: dict[int, float] = {}
        for m in steps:
            for k, v in m.items():
                if k.startswith(FIRST_ERROR):
                    i = int(k.removeprefix(FIRST_ERROR))
                    hist[i] = hist.get(i, 0) + v
        total = sum(hist.values())
        values.update({f"first_error@{i}": v / total for i, v in hist.items() if total})
        per.setdefault(r.point, []).append(values)
    depth = max(
        (int(k.split("@")[1]) + 1 for lst in per.values() for v in lst for k in v if "@" in k), default=0
    )
    keys = TRAINING + [f"first_error@{i}" for i in range(depth)]
    heads = [
        "point",
        "n",
        *(k.removeprefix("rollout/").removeprefix("scope/").removeprefix("dynamic/") for k in keys),
    ]
    lines = [
        "Training rollouts: mean ± std over seeds of each run's mean over its steps; `first_error@k`: "
        "the fraction of failed rollouts whose first wrong step (PRM) is step k, pooled over the run.",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for point, lst in per.items():
        cells = [point, str(len(lst))]
        for k in keys:
            xs = [v[k] for v in lst if k in v]
            cells.append(_fmt(*mean_std(xs)) if xs else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(mu: float | None, sd: float | None, digits: int = 3) -> str:
    if mu is None:
        return ""
    return f"{mu:.{digits}f}" if sd is None or math.isnan(sd) else f"{mu:.{digits}f} ± {sd:.{digits}f}"


def _write_tables(out: Path, rows: list[dict[str, Any]], keys: list[str], stage: str) -> None:
    cols = ["point", "when", "n", "seeds", "step"]
    for k in keys + ["wall_s"]:
        cols += [f"{k}_mean", f"{k}_std"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for row in rows:
            w.writerow({c: (f"{v:.6g}" if isinstance(v, float) else v) for c, v in row.items()})
    heads = ["point", "when", "n", "step"] + [k.removeprefix("eval/") for k in keys] + ["wall s"]
    lines = [
        f"Mean ± sample std (n-1) over seeds; `initial` = first eval line (before training), "
        f"`final` = last eval line; `final - B`: per-seed paired difference to point B. Sweep: `{out}`.",
        "",
        "| " + " | ".join(heads) + " |",
        "|" + "---|" * len(heads),
    ]
    for row in rows:
        cells = [row["point"], row["when"], str(row["n"]), row["step"]]
        cells += [_fmt(row.get(f"{k}_mean"), row.get(f"{k}_std")) for k in keys]
        cells.append(_fmt(row.get("wall_s_mean"), row.get("wall_s_std"), 0))
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join([*lines, "", *training_table(out, stage)]) + "\n")


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="write DIR/runs.txt (for slurm/sweep.sh) and DIR/sweep.json")
    e.add_argument("spec")
    e.add_argument("--out", required=True)
    e.add_argument("overrides", nargs="*", help="key=value appended to the spec's fixed overrides")
    r = sub.add_parser("run", help="run the sweep locally, one run after another; skips finished runs")
    r.add_argument("spec")
    r.add_argument("--out", required=True)
    r.add_argument("overrides", nargs="*", help="key=value appended to the spec's fixed overrides")
    r.add_argument(
        "--stage", choices=sorted(STAGES), default=None, help="default: the spec's `stage`, else train"
    )
    r.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    c = sub.add_parser("collect", help="DIR/results.md and DIR/results.csv: mean/std over seeds")
    c.add_argument("dir")
    c.add_argument("--metrics-stage", default="rl", help="metrics.jsonl `stage` to read (default rl)")
    c.add_argument("--baseline", default=None, help="point to compare the others with, seed by seed")
    args, extra = p.parse_known_args(argv)  # key=value may come after --out too
    stray = [x for x in extra if "=" not in x or x.startswith("-") or args.cmd == "collect"]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.cmd == "expand":
            runs = write_sweep(with_overrides(load_spec(args.spec), args.overrides), Path(args.out))
            print(f"{len(runs)} runs -> {Path(args.out) / 'runs.txt'}")
            print(f"sbatch --array=0-{len(runs) - 1} slurm/sweep.sh {args.out}")
            return 0
        if args.cmd == "run":
            spec = with_overrides(load_spec(args.spec), args.overrides)
            return run_all(spec, Path(args.out), args.stage, args.jobs)
        rows = collect(Path(args.dir), args.metrics_stage, args.baseline)
        print((Path(args.dir) / "results.md").read_text(), end="")
        return 0 if rows else 1
    except SpecError as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
