"""Config errors are one clear line (exit status 2, no traceback); valid configs load with overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from scope_mega.cli import CONFIG_ERROR_EXIT_CODE, main
from scope_mega.config import ConfigError, load_config

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


def test_trainer_refuses_what_it_cannot_run(capsys):
    for overrides, fragment in [
        (["loss.kl_coef=0.1"], "loss.kl_coef > 0 needs the starting weights"),
        (["loss.off_policy=clip"], "loss.off_policy=clip needs the guide's logprobs"),
        (["scope.guide=engine"], "scope.guide=engine needs guide.guide_model"),
        (["data.task=math"], "scope.guide=oracle is Countdown's"),
        (["rollout.engine=vllm"], "rollout.engine=vllm is not wired"),
        (["guide.prm=model"], "guide.prm=model needs guide.prm_path"),
        (["guide.prm=model", "guide.prm_path=/x", "parallel.pp=2"], "guide.prm=model scores with pipeline"),
    ]:
        code = main(["train", str(TINY), *overrides, "run_dir=/nonexistent/never-written"])
        err = capsys.readouterr().err.strip()
        assert code == CONFIG_ERROR_EXIT_CODE and err.startswith(f"config error: {fragment}"), err
