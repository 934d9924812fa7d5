"""`checkpoint.export_hf`: after RL steps of the tiny config the run directory holds the policy as an HF
model directory that transformers loads with every key, whose logits are the Megatron policy's, and
that `scope-mega convert megatron-to-hf` of the run's `latest` checkpoint reproduces exactly."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_rl import scope_mega, train
from safetensors.torch import load_file

from scope_mega.data.hf_tokenizer import load_model_tokenizer
from scope_mega.data.tokenizer import load_tokenizer
from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.slow]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _load(folder: Path) -> torch.nn.Module:
    """The exported model in transformers, which must find every weight and nothing else."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _megatron_logits(run_dir: str, tokens: torch.Tensor, out: str) -> None:
    """Build the policy as the trainer does, load the run's latest RL checkpoint, save its logits."""
    from scope_mega.config import RunConfig, from_dict
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.run_dir import resolve_checkpoint
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights.megatron_ckpt import load_model_weights

    ckpt = resolve_checkpoint(Path(run_dir) / "checkpoints_rl")
    cfg = from_dict(RunConfig, json.loads((ckpt / "trainer_state.json").read_text())["config"])
    device = init_distributed(device="cpu")
    try:
        model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
        load_model_weights(ckpt, model)
        b, s = tokens.shape
        with torch.no_grad():
            logits = model(tokens, torch.arange(s).expand(b, s), attention_mask=None)
        torch.save(logits[..., : spec.vocab_size].clone(), out)
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two RL steps of the tiny config, exporting at the end."""
    return train(tmp_path_factory.mktemp("export") / "run", 2, "checkpoint.export_hf=final", nproc=1)


def test_the_export_is_a_complete_hf_model_directory(run: Path):
    hf = run / "hf"
    assert sorted(p.name for p in hf.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
    run_files = ["checkpoints_rl", "hf", "metrics.jsonl", "run.lock", "tokenizer"]  # run.lock: the run's lock
    assert sorted(p.name for p in run.iterdir()) == run_files
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["dtype"], config["vocab_size"]) == ("float32", 128)
    gen = transformers.GenerationConfig.from_pretrained(hf)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, [2], 3)
    sampling = (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.max_new_tokens)
    assert sampling == (True, 1.0, 1.0, 0, 12)  # the rollout settings of the run
    exported, trained = load_model_tokenizer(hf), load_tokenizer(run / "tokenizer")
    text = "numbers: 3 7 9\ntarget: 30\n3 * 7 = 21\n21 + 9 = 30\nanswer: 30"
    assert exported.processor.serialized_model_proto() == trained.processor.serialized_model_proto()
    assert exported.decode(exported.encode(text)) == text
    tied = _load(hf)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()


def test_logits_equal_the_megatron_policy(run: Path, tmp_path: Path):
    tokens = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    spawn_local(_megatron_logits, 1, str(run), tokens, str(tmp_path / "megatron.pt"))
    want = torch.load(tmp_path / "megatron.pt")
    with torch.no_grad():
        got = _load(run / "hf")(tokens).logits
    assert got.shape == want.shape == (3, 24, 128)
    diff = (got - want).abs().max().item()
    print(f"max |HF export - Megatron| = {diff:.3e} on logits of std {want.std():.3e}")
    assert want.std() > 0.05  # logits far from zero: 1e-5 is a tight bound on them
    assert diff <= 1e-5


def test_convert_of_the_latest_marker_reproduces_the_export(run: Path, tmp_path: Path):
    out = tmp_path / "converted"
    marker = run / "checkpoints_rl" / "latest"
    scope_mega("convert", "megatron-to-hf", "--megatron-dir", str(marker), "--out", str(out))
    _assert_same_tensors(out, run / "hf")
    assert (out / "config.json").read_text() == (run / "hf" / "config.json").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_periodic_exports_from_two_ranks(layout: str, tmp_path: Path):
    """Every step: step 1 under hf_steps/, the last step as the final export; TP shards merged, or
    the second pipeline stage's layers and head sent to the first."""
    run = train(tmp_path / "run", 2, "checkpoint.export_hf=1", layout)
    assert [p.name for p in (run / "hf_steps").iterdir()] == ["step_00000001"]
    _load(run / "hf_steps" / "step_00000001")
    _load(run / "hf")
    out = tmp_path / "converted"
    scope_mega("convert", "megatron-to-hf", "--megatron-dir", str(run / "checkpoints_rl"), "--out", str(out))
    _assert_same_tensors(out, run / "hf")
