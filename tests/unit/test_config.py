"""Config errors are one clear line (exit status 2, no traceback); valid configs load with overrides."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from scope_mega.cli import CONFIG_ERROR_EXIT_CODE, main
from scope_mega.config import ConfigError, RunConfig
from scope_mega.validation import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny_cpu.yaml"


def _error(overrides: list[str], capsys) -> str:
    code = main(["sft", str(TINY), "--dry-run", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == CONFIG_ERROR_EXIT_CODE
    assert len(err.splitlines()) == 1, err
    return err


def test_overrides_are_typed_and_applied():
    cfg = load_config(TINY, ["optim.lr=5e-1", "parallel.tp=2", "model.hf_config.hidden_size=256"])
    assert cfg.optim.lr == 0.5 and cfg.parallel.tp == 2
    assert cfg.model.hf_config["hidden_size"] == 256
    assert cfg.task.ops == ("+", "-", "*")


def test_unknown_key_suggests_the_right_one(capsys):
    err = _error(["optim.lrr=0.1"], capsys)
    assert err == "config error: unknown config key 'optim.lrr'; did you mean 'lr'?"


def test_tp_must_divide_heads_and_kv_groups(capsys):
    err = _error(["parallel.tp=3"], capsys)
    assert err == "config error: parallel.tp=3 does not divide num_attention_heads=4; choose a divisor of 4"
    err = _error(["parallel.tp=4"], capsys)  # 4 heads but 2 KV groups
    assert "does not divide num_key_value_heads=2 (KV groups)" in err


def test_pp_must_divide_layers(capsys):
    err = _error(["parallel.pp=3"], capsys)
    assert err == "config error: parallel.pp=3 does not divide num_hidden_layers=4; choose a divisor of 4"


def test_full_recompute_groups_must_divide_each_stage(capsys):
    err = _error(["model.recompute=full", "parallel.pp=2", "model.recompute_num_layers=4"], capsys)
    assert err == (
        "config error: model.recompute_num_layers=4 must divide the 2 layers of each pipeline stage with "
        "model.recompute_method=uniform (or use recompute_method=block)"
    )


def test_rl_lr_decays_downwards(capsys):
    err = _error(["rl.decay_style=cosine", "rl.min_lr=1e-3"], capsys)
    assert err == (
        "config error: rl.min_lr=0.001 is above rl.lr=0.0001: rl.decay_style=cosine decays from rl.lr "
        "down to rl.min_lr; lower rl.min_lr"
    )
    load_config(TINY, ["rl.decay_style=constant", "rl.min_lr=1e-3"])  # constant: rl.min_lr is unused


def test_thd_packing_needs_a_token_budget(capsys):
    err = _error(["rl.packing=thd", "rl.max_tokens_per_micro_batch=null"], capsys)
    assert err == (
        "config error: rl.packing=thd packs micro-batches by a token budget: set "
        "rl.max_tokens_per_micro_batch (e.g. 4 x the longest sequence), or rl.packing=padded"
    )
    assert load_config(TINY, ["rl.packing=thd"]).rl.max_tokens_per_micro_batch == 512  # the demo's
    assert "rl.packing must be one of" in _error(["rl.packing=bshd"], capsys)


def test_fp8_without_transformer_engine(capsys):
    err = _error(["model.fp8.enabled=true"], capsys)
    assert err.startswith("config error: model.fp8.enabled needs Transformer Engine on a CUDA device")


def test_wrong_types_and_choices(capsys):
    assert "optim.lr must be a number" in _error(["optim.lr=fast"], capsys)
    assert "model.transformer_impl must be one of" in _error(["model.transformer_impl=fast"], capsys)
    with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'; supported: llama, qwen2"):
        load_config(TINY, ["model.hf_config.model_type=gpt2"])


def test_cli_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "scope_mega.cli", "sft", str(TINY), "parallel.pp=3", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == CONFIG_ERROR_EXIT_CODE
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: parallel.pp=3")


def test_trainer_refuses_what_it_cannot_run(capsys, tmp_path):
    for overrides, fragment in [
        (["loss.kl_coef=0.1"], "loss.kl_coef > 0 needs the starting weights"),
        (["loss.off_policy=clip"], "loss.off_policy=clip needs the guide's logprobs"),
        (
            ["rl.old_logprobs=rollout", "loss.tis_cap=2"],
            "rl.old_logprobs=rollout makes loss.tis_cap's weight",
        ),
        (["scope.guide=engine"], "scope.guide=engine needs guide.guide_model"),
        (["data.task=math"], "scope.guide=oracle is Countdown's"),
        (["rollout.engine=vllm", "rollout.vllm_fp8_weights=true"], "rollout.vllm_fp8_weights needs CUDA"),
        (
            ["rollout.engine=vllm", "rollout.vllm_tensor_parallel_size=2"],
            "rollout.vllm_tensor_parallel_size=2 must divide the world size 1",
        ),
        (
            ["rollout.engine=vllm", "model.hf_config.num_attention_heads=8"],
            "rollout.engine=vllm cannot serve the policy: vLLM's CPU attention cannot run head size 16",
        ),
        (
            [
                "rollout.engine=vllm",
                *("model.hf_config.hidden_size=192", "model.hf_config.num_attention_heads=6"),
                *("model.hf_config.num_key_value_heads=3", "rollout.vllm_tensor_parallel_size=2"),
                "WORLD=2",
            ],
            "rollout.engine=vllm cannot serve the policy: vLLM tensor parallel size 2 neither divides the "
            "model's 3 KV heads",
        ),
        (["guide.prm=model"], "guide.prm=model needs guide.prm_path"),
        (["rl.max_staleness=1"], "rl.max_staleness=1 trains on tokens of older policies"),
        (
            ["rl.max_staleness=1", "loss.tis_cap=2", "rl.old_logprobs=rollout"],
            "rl.max_staleness > 0 needs the proximal policy's logprobs",
        ),
        (
            ["rl.max_staleness=1", "loss.tis_cap=2", "rollout.temperature=1.6"],
            "rl.max_staleness > 0 weights tokens by the engine's logprobs against the trainer's",
        ),
        (
            ["rl.max_staleness=1", "loss.tis_cap=2", "rl.dynamic_sampling=refill"],
            "rl.dynamic_sampling=refill samples extra rounds",
        ),
        (
            ["rl.max_staleness=1", "loss.tis_cap=2", "rl.extra_prompts=3", "WORLD=2"],
            "rl.extra_prompts=3 must be divisible by the DP size 2",
        ),
    ]:
        world = [o for o in overrides if o.startswith("WORLD=")]
        overrides = [o for o in overrides if o not in world]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WORLD_SIZE", world[0].split("=")[1] if world else "1")
            code = main(["train", str(TINY), *overrides, f"run_dir={tmp_path / 'never-written'}"])
        err = capsys.readouterr().err.strip()
        assert not (tmp_path / "never-written").exists(), f"{overrides}: refused only after starting work"
        assert code == CONFIG_ERROR_EXIT_CODE and err.startswith(f"config error: {fragment}"), err


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.steps=-5", "rl.steps must be >= 0, got -5"),
        ("rollout.temperature=-1", "rollout.temperature must be >= 0, got -1.0"),
        ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
        ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1], got 1.5"),
        ("rl.group_size=1", "rl.group_size must be >= 2, got 1"),
        ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
        ("optim.lr=-1e-3", "optim.lr must be > 0, got -0.001"),
        ("optim.adam_beta2=1", "optim.adam_beta2 must be in [0, 1), got 1.0"),
        ("rl.lr=.nan", "rl.lr must be > 0, got nan"),
        ("loss.entropy_coef=.inf", "loss.entropy_coef must be finite, got inf"),
        ("loss.clip_low=1", "loss.clip_low must be in [0, 1), got 1.0"),
        ("scope.prm_threshold=0", "scope.prm_threshold must be in (0, 1], got 0.0"),
        ("task.min_numbers=1", "task.min_numbers must be in [2, 6], got 1"),
        ("advantage.eps=-1", "advantage.eps must be >= 0, got -1.0"),
        ("parallel.tp=0", "parallel.tp must be >= 1, got 0"),
        ("seed=-1", "seed must be >= 0, got -1"),
    ],
)
def test_out_of_range_values_are_one_line_errors(override, message, capsys):
    assert _error([override], capsys) == f"config error: {message}"
    code = main(["train", str(TINY), override, "--dry-run"])
    assert code == CONFIG_ERROR_EXIT_CODE
    assert capsys.readouterr().err.strip() == f"config error: {message}"


def test_the_cli_refuses_negative_steps_before_a_dry_run():
    proc = subprocess.run(
        [sys.executable, "-m", "scope_mega.cli", "train", str(TINY), "rl.steps=-5", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        CONFIG_ERROR_EXIT_CODE,
        "",
        "config error: rl.steps must be >= 0, got -5\n",
    )


def _numeric_fields(cls: type, path: str = ""):
    """(dotted key, field) of every int or float option under the config dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{path}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{key}.")
        elif {int, float} & {tp, *typing.get_args(tp)}:
            yield key, f


def test_every_numeric_option_declares_its_range():
    fields = dict(_numeric_fields(RunConfig))
    assert {"rl.steps", "rollout.temperature", "rollout.top_p", "rl.group_size", "optim.lr"} <= fields.keys()
    assert len(fields) >= 60  # the walk reaches every section
    missing = [key for key, f in fields.items() if "range" not in f.metadata]
    assert not missing, f"numeric options without a declared range: {missing}"


@pytest.mark.parametrize(
    "value, exports",
    [
        ("off", {}),  # YAML 1.1 reads a bare `off` as false: taken back as "off"
        ("final", {7: "hf"}),
        ("3", {3: "hf_steps/step_00000003", 6: "hf_steps/step_00000006", 7: "hf"}),
        ("7", {7: "hf"}),  # the last step is the final export, not also a periodic one
    ],
)
def test_export_hf_says_where_and_when(value, exports):
    from scope_mega.weights.hf_export import hf_export_dir

    cfg = load_config(TINY, [f"checkpoint.export_hf={value}", "rl.steps=7", "run_dir=R"])
    got = {}
    for step in range(1, 8):
        where = hf_export_dir(cfg, step, final=step == 7)
        if where is not None:
            got[step] = str(where.relative_to("R"))
        assert hf_export_dir(cfg, step, final=False) is None or step < 7
    assert got == exports


def test_export_hf_refuses_other_values(capsys):
    err = _error(["checkpoint.export_hf=0"], capsys)
    assert err == "config error: checkpoint.export_hf must be >= 1, got 0"
    assert _error(["checkpoint.export_hf=every"], capsys) == (
        "config error: checkpoint.export_hf must be one of 'off', 'final' or an integer, got 'every'"
    )
