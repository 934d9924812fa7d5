"""Issue 27, item 10: a bad value in a config is one `config error:` line and exit 2, never a
traceback. Bad values inside `model.hf_config` (zero or negative sizes, a hidden size the heads do not
divide, heads the KV heads do not divide, a misspelled key, a value transformers refuses) are refused
by the checks `--dry-run` runs; and a property test applies random dotted overrides, `model.hf_config.*`
ones included, to examples/tiny_cpu.yaml through the CLI's `--dry-run` in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scope_mega.cli import CONFIG_ERROR_EXIT_CODE, main
from scope_mega.config import RunConfig, to_dict

REPO = Path(__file__).resolve().parents[2]
TINY_CPU = str(REPO / "examples" / "tiny_cpu.yaml")


def _outcome(argv: list[str], capsys) -> tuple[int, list[str]]:
    """The exit status of `scope-mega ARGV` run in-process and its `config error:` lines; any other
    exception escapes (a traceback: the test fails)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("config error:")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_attention_heads=0", "model.hf_config: num_attention_heads must be a positive integer, got 0"),
        ("hidden_size=-128", "model.hf_config: hidden_size must be a positive integer, got -128"),
        ("intermediate_size=1.5", "model.hf_config: intermediate_size must be a positive integer, got 1.5"),
        ("num_hidden_layers=null", "model.hf_config: num_hidden_layers must be a positive integer, got None"),
        (
            "hidden_size=130",
            "model.hf_config: The hidden size (130) is not a multiple of the number of attention",
        ),
        (
            "num_key_value_heads=3",
            "model.hf_config: num_attention_heads=4 is not a multiple of num_key_value_heads=3",
        ),
        (
            "num_hiden_layers=4",
            "model.hf_config.num_hiden_layers is not a field of transformers' llama config; "
            "did you mean 'num_hidden_layers'?",
        ),
        ("head_dim=33", "model.hf_config: RoPE requires an even rotary dimension, but got `head_dim`=33"),
        ("model_type=qwen2 model.hf_config.hidden_size=132", "model.hf_config: the head size 33 is odd"),
        ("rms_norm_eps=-1.0", "model.hf_config: rms_norm_eps must be > 0, got -1.0"),
        ("rms_norm_eps=1", "model.hf_config: Field 'rms_norm_eps' expected float, got int (value: 1)"),
        ("rope_theta=abc", "model.hf_config: rope_theta (the RoPE base) must be a number > 0"),
        (
            "hidden_act=gelu",
            "model.hf_config: hidden_act='gelu', but the supported families' MLPs are SwiGLU",
        ),
        ("tie_word_embeddings=maybe", "model.hf_config: Field 'tie_word_embeddings' expected bool"),
        ("rope_scaling={rope_type: llama3}", "model.hf_config: Missing required keys in `rope_parameters`"),
    ],
)
def test_bad_hf_config_values_are_one_line(override, message, capsys):
    """Each mistake: one line, exit 2, in `sft --dry-run` and in `train --dry-run` (the plan's)."""
    for command in ("sft", "train"):
        overrides = [f"model.hf_config.{o}" for o in override.split(" model.hf_config.")]
        code, errors = _outcome([command, TINY_CPU, "--dry-run", *overrides], capsys)
        assert code == CONFIG_ERROR_EXIT_CODE and len(errors) == 1, (command, override, errors)
        assert errors[0].startswith(f"config error: {message}"), (command, errors)


def test_bad_config_json_of_a_model_directory_is_one_line(tmp_path, capsys):
    """`model.hf_config: DIR`: a config.json with a negative size, and one that is not JSON, name it."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": -64, "num_attention_heads": 4}))
    code, errors = _outcome(["sft", TINY_CPU, "--dry-run", f"model.hf_config={tmp_path}"], capsys)
    assert code == CONFIG_ERROR_EXIT_CODE
    assert errors == [f"config error: {config}: hidden_size must be a positive integer, got -64"]
    config.write_text('{"model_type": "llama", "hidden_')
    code, errors = _outcome(["sft", TINY_CPU, "--dry-run", f"model.hf_config={tmp_path}"], capsys)
    assert code == CONFIG_ERROR_EXIT_CODE and len(errors) == 1
    assert errors[0].startswith(f"config error: {config} is not a readable JSON file"), errors


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [f"{prefix}{key}"]
    return keys


CONFIG_KEYS = _leaves(to_dict(RunConfig()))
HF_KEYS = [f"model.hf_config.{k}" for k in sorted(transformers.AutoConfig.for_model("llama").to_dict())]
HF_KEYS += ["model.hf_config.rope_scaling.rope_type", "model.hf_config.rope_scaling.factor"]
NAME = st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True)
KEYS = st.one_of(
    st.sampled_from(HF_KEYS),
    st.sampled_from(HF_KEYS),
    st.sampled_from(CONFIG_KEYS),
    NAME.map(lambda name: f"model.hf_config.{name}"),  # unknown (or misspelled) HF keys
    st.tuples(st.sampled_from(sorted({k.split(".")[0] for k in CONFIG_KEYS})), NAME).map(".".join),
)
VALUES = st.one_of(
    st.integers(-3, 3).map(str),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([".nan", ".inf", "-.inf", "null", "true", "off", "[]", "{}", "[1, 2]", "{a: 1}", "''"]),
    st.sampled_from(["llama", "qwen2", "gpt2", "silu", "gelu", "cpu", "cuda", "vllm", "llama3", "random"]),
    st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]), max_size=8),
)


@settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    command=st.sampled_from(["sft", "train"]),
    overrides=st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3),
)
def test_random_overrides_end_in_one_line_or_a_clean_exit(command, overrides, capsys):
    """Random `key=value` overrides through `--dry-run`: exit 0 without a `config error:` line, or exit
    2 with exactly one; never an exception."""
    capsys.readouterr()
    argv = [command, TINY_CPU, "--dry-run", *(f"{key}={value}" for key, value in overrides)]
    code, errors = _outcome(argv, capsys)
    assert (code, len(errors)) in ((0, 0), (CONFIG_ERROR_EXIT_CODE, 1)), (argv, code, errors)
