"""`python -m checkpoints_convert` end to end, and every bad input as a one-line error with no partial
output left under the final name."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import COMMON, TOKENIZER_CONFIG, hf_model, write_hf_checkpoint
from safetensors.torch import load_file, save_file

from checkpoints_convert.__main__ import main
from scope_mega.runtime.spawn import spawn_local

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "checkpoints_convert", *args], cwd=REPO, capture_output=True, text=True
    )


def _error_line(capsys, *args: str) -> str:
    """Run the CLI in-process; it must fail with status 2 and exactly one stderr line."""
    capsys.readouterr()  # drop what the test printed while preparing
    assert main(list(args)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convert error: "), lines
    return lines[0]


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    """A tied Llama-3.1 checkpoint in bf16 (the dtype real checkpoints ship), in 3 safetensors shards."""
    path = tmp_path_factory.mktemp("bf16") / "hf"
    hf_model("llama31_tied").to(torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    (path / "tokenizer_config.json").write_text(TOKENIZER_CONFIG)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def imported(bf16_llama: Path) -> Path:
    out = bf16_llama.parent / "megatron"
    result = _cli("hf-to-megatron", "--hf-dir", str(bf16_llama), "--out", str(out), "--tp", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["hf", "model"]
    return out


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.distributed
def test_cli_round_trip_tp2_bf16(bf16_llama: Path, imported: Path, tmp_path: Path):
    out = tmp_path / "back"
    result = _cli("megatron-to-hf", "--megatron-dir", str(imported), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    original, exported = _all_tensors(bf16_llama), _all_tensors(out)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name
    config = lambda folder: json.loads((folder / "config.json").read_text())
    assert config(out) == config(bf16_llama)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_export_of_a_trainer_checkpoint_takes_the_config_it_recorded(
    bf16_llama: Path, imported: Path, tmp_path: Path
):
    from scope_mega.weights.megatron_to_hf import export_hf_checkpoint

    step = tmp_path / "step_00000001"
    shutil.copytree(imported / "model", step / "model")
    state = {"config": {"model": {"hf_config": str(bf16_llama)}}}
    (step / "trainer_state.json").write_text(json.dumps(state))
    out = export_hf_checkpoint(step, tmp_path / "hf")
    assert sorted(_all_tensors(out)) == sorted(_all_tensors(bf16_llama))
    assert (out / "tokenizer_config.json").read_text() == TOKENIZER_CONFIG


def test_export_follows_the_latest_marker(capsys, bf16_llama: Path, imported: Path, tmp_path: Path):
    """A checkpoints folder and its `latest` marker name the checkpoint the marker points to."""
    root = tmp_path / "checkpoints_rl"
    step = root / "step_00000002"
    shutil.copytree(imported / "model", step / "model")
    state = {"config": {"model": {"hf_config": str(bf16_llama)}}}
    (step / "trainer_state.json").write_text(json.dumps(state))
    (root / "step_00000001").mkdir()  # an older step: the marker, not the folder listing, decides
    (root / "latest").write_text("step_00000002")
    want = _all_tensors(bf16_llama)
    for i, src in enumerate([root, root / "latest"]):
        assert main(["megatron-to-hf", "--megatron-dir", str(src), "--out", str(tmp_path / f"hf{i}")]) == 0
        got = _all_tensors(tmp_path / f"hf{i}")
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    (root / "latest").write_text("step_00000001")  # a marker pointing at an incomplete checkpoint
    marker, out = str(root / "latest"), str(tmp_path / "x")
    err = _error_line(capsys, "megatron-to-hf", "--megatron-dir", marker, "--out", out)
    incomplete = root / "step_00000001"
    assert err == f"convert error: {marker} points to {incomplete}, which is not a complete checkpoint"
    assert not (tmp_path / "x").exists()


def test_unsupported_architecture(capsys, tmp_path: Path):
    transformers.AutoConfig.for_model("gpt2").save_pretrained(tmp_path / "gpt2")
    args = ("hf-to-megatron", "--hf-dir", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o"))
    line = _error_line(capsys, *args)
    assert "unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3, mistral" in line


@pytest.mark.parametrize(
    "tp,message",
    [(3, "tp=3 does not divide num_attention_heads=4"), (4, "tp=4 does not divide num_key_value_heads=2")],
)
def test_tp_must_divide_heads_and_kv_groups(capsys, tmp_path: Path, tp, message):
    hf = write_hf_checkpoint("llama", tmp_path / "hf")
    args = ("hf-to-megatron", "--hf-dir", str(hf), "--out", str(tmp_path / "o"), "--tp", str(tp))
    assert message in _error_line(capsys, *args)


def test_missing_and_truncated_safetensors(capsys, bf16_llama: Path, tmp_path: Path):
    hf = tmp_path / "hf"
    shutil.copytree(bf16_llama, hf)
    shard = sorted(hf.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    args = ("hf-to-megatron", "--hf-dir", str(hf), "--out", str(tmp_path / "o"))
    assert f"{shard} is truncated or corrupt" in _error_line(capsys, *args)
    shard.unlink()
    assert f"safetensors file {shard} is missing" in _error_line(capsys, *args)
    assert not (tmp_path / "o").exists()


def test_extra_hf_tensor_is_refused(capsys, tmp_path: Path):
    hf = write_hf_checkpoint("llama", tmp_path / "hf")
    tensors = load_file(hf / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(COMMON["hidden_size"])
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    line = _error_line(capsys, "hf-to-megatron", "--hf-dir", str(hf), "--out", str(tmp_path / "o"))
    assert "HF tensors not used by the llama mapping (tie_word_embeddings=False): " in line
    assert "model.layers.0.self_attn.o_proj.bias" in line


def test_export_refuses_a_config_that_does_not_match(capsys, imported: Path, tmp_path: Path):
    untied = write_hf_checkpoint("llama", tmp_path / "untied")  # checkpoint is tied: no output_layer
    args = ("megatron-to-hf", "--megatron-dir", str(imported), "--out", str(tmp_path / "o"))
    assert "has no tensor for output_layer.weight" in _error_line(capsys, *args, "--hf-config", str(untied))
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(capsys, imported: Path, bf16_llama: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old").write_text("x")
    line = _error_line(capsys, "megatron-to-hf", "--megatron-dir", str(imported), "--out", str(out))
    assert "already exists; pass --force to replace it" in line
    args = ("hf-to-megatron", "--hf-dir", str(bf16_llama), "--out", str(out), "--tp", "2")
    assert "already exists" in _error_line(capsys, *args)
    assert main(["megatron-to-hf", "--megatron-dir", str(imported), "--out", str(out), "--force"]) == 0
    assert not (out / "old").exists() and (out / "model.safetensors.index.json").is_file()
    assert _leftovers(out) == [out]


def test_interrupted_export_leaves_nothing(monkeypatch, imported: Path, tmp_path: Path):
    from scope_mega.weights import files
    from scope_mega.weights.megatron_to_hf import export_hf_checkpoint

    real_write, calls = files.SafetensorsShardWriter.write, []

    def write_then_die(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(files.SafetensorsShardWriter, "write", write_then_die)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        export_hf_checkpoint(imported, out, max_shard_bytes=1000)
    assert _leftovers(out) == []


def _interrupted_import(hf: str, out: str):
    from megatron.core import dist_checkpointing

    from scope_mega.weights.hf_to_megatron import import_worker

    real_save = dist_checkpointing.save

    def save_then_die(state_dict, directory, *args, **kwargs):
        real_save(state_dict, directory, *args, **kwargs)
        raise RuntimeError("interrupted")  # weights on disk, folder not yet published

    dist_checkpointing.save = save_then_die
    import_worker(hf, out, 1, 1)


@pytest.mark.distributed
def test_interrupted_import_leaves_nothing(bf16_llama: Path, tmp_path: Path):
    out = tmp_path / "o"
    with pytest.raises(Exception, match="interrupted"):
        spawn_local(_interrupted_import, 1, str(bf16_llama), str(out))
    assert _leftovers(out) == []


@pytest.mark.distributed
def test_killed_import_never_shows_under_the_final_name(bf16_llama: Path, tmp_path: Path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "checkpoints_convert", "hf-to-megatron", "--hf-dir", str(bf16_llama)]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith("o.tmp-")] and time.time() < deadline:
        assert proc.poll() is None, "conversion ended before it could be interrupted"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
