"""Every family x every (TP, PP) layout, on 4 gloo processes: HF -> Megatron import, the trainer's load
of the result, logits parity with the transformers forward, live streaming of HF-named weights, and
Megatron -> HF export bitwise."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from _tiny_models import CASES, LM_CASES, TOKENIZER_CONFIG, write_hf_checkpoint
from safetensors.torch import load_file

from scope_mega.runtime.spawn import spawn_local

pytestmark = [pytest.mark.distributed]

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
WORLD = 4
BUCKET_BYTES = 8 * 1024  # small, so that buckets really split
PARAMS = [(case, tp, pp) for case in CASES for tp, pp in LAYOUTS]
LM_PARAMS = [p for p in PARAMS if p[0] in LM_CASES]


def _tag(case, tp, pp):
    return f"{case}-tp{tp}pp{pp}"


def _tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))


def _stage_logits(model, tokens):
    """Full-vocab logits on the last PP stage (None elsewhere): hidden states go stage to stage by p2p."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, attention_mask=None)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)


def _stream_report(model, spec, hf_dir: Path) -> dict:
    from scope_mega.weights.stream_collective import iter_hf_weights

    ref = load_file(hf_dir / "model.safetensors")
    got, oversized, buckets = {}, 0, 0
    for bucket in iter_hf_weights(model, spec, bucket_bytes=BUCKET_BYTES):
        buckets += 1
        oversized += len(bucket) > 1 and sum(t.numel() * t.element_size() for _, t in bucket) > BUCKET_BYTES
        for name, tensor in bucket:
            assert name not in got, f"{name} streamed twice"
            got[name] = tensor.clone()
    return {
        "names_equal": sorted(got) == sorted(ref),
        "mismatched": [n for n in ref if n not in got or not torch.equal(got[n], ref[n])],
        "oversized": int(oversized),
        "buckets": buckets,
    }


def _worker(root: str):
    """Per layout and family: import (meta model, streamed save), then load the checkpoint the way
    the trainer does into a real model of the same layout, then logits and live streaming from it;
    then load the checkpoint imported at the previous layout into that model and stream again."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from scope_mega.config import ModelConfig
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.models.prm import build_prm_model, load_prm_weights
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed
    from scope_mega.weights import files
    from scope_mega.weights.hf_to_megatron import build_model, plan_import, write_megatron_checkpoint
    from scope_mega.weights.megatron_ckpt import load_model_weights

    root = Path(root)
    tokens = _tokens()
    for tp, pp in LAYOUTS:
        device = init_distributed(tp=tp, pp=pp, device="cpu", seed=tp * 10 + pp)
        rank = dist.get_rank()
        for case in CASES:
            tag, hf_dir = _tag(case, tp, pp), root / "hf" / case
            out = root / "meg" / tag
            prm = case == "qwen2_prm"
            plan = plan_import(hf_dir, out, tp, pp, force=False)
            dist.barrier()  # everyone checked `out` before rank 0 creates it
            if rank == 0:
                (out / "model").mkdir(parents=True)
                files.copy_side_files(hf_dir, out / "hf")
            dist.barrier()
            write_megatron_checkpoint(plan, device, out / "model", build_model)
            real = ModelConfig(hf_config=str(hf_dir), transformer_impl="local")
            model, spec = (build_prm_model if prm else build_gpt_model)(real, plan.parallel, device)
            if prm:
                load_prm_weights(out, model, spec)
            else:
                load_model_weights(out, model)
            model.eval()
            with torch.no_grad():
                logits = _stage_logits(model, tokens) if case in LM_CASES else None
            lead = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            if logits is not None and lead:
                torch.save(logits[..., : spec.vocab_size].clone(), root / "logits" / f"{tag}.pt")
            report = _stream_report(model, spec, hf_dir)
            (root / "stream" / f"{tag}-rank{rank}.json").write_text(json.dumps(report))
            if (tp, pp) != LAYOUTS[0]:  # the checkpoint imported at the previous layout loads here too
                prev = LAYOUTS[LAYOUTS.index((tp, pp)) - 1]
                load_model_weights(root / "meg" / _tag(case, *prev), model)
                report = _stream_report(model, spec, hf_dir)
                (root / "cross" / f"{tag}-rank{rank}.json").write_text(json.dumps(report))
        destroy_distributed(keep_process_group=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    for sub in ("hf", "meg", "logits", "stream", "cross", "ref"):
        (root / sub).mkdir()
    tokens = _tokens()
    for i, case in enumerate(CASES):
        write_hf_checkpoint(case, root / "hf" / case, seed=i)
        if case in LM_CASES:
            model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf" / case).eval()
            with torch.no_grad():
                torch.save(model(tokens).logits, root / "ref" / f"{case}.pt")
    spawn_local(_worker, WORLD, str(root))
    return root


def _load_hf(case: str, path: Path):
    if case == "qwen2_prm":
        from scope_mega.weights.hf_prm import Qwen2ForProcessRewardModel

        return Qwen2ForProcessRewardModel.from_pretrained(path, output_loading_info=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)


@pytest.mark.parametrize("case,tp,pp", PARAMS, ids=[_tag(*p) for p in PARAMS])
def test_hf_megatron_hf_is_bitwise_identical(converted: Path, tmp_path: Path, case, tp, pp):
    from scope_mega.weights.megatron_to_hf import export_hf_checkpoint

    src = converted / "meg" / _tag(case, tp, pp)
    out = export_hf_checkpoint(src, tmp_path / "hf", max_shard_bytes=20_000)
    original = load_file(converted / "hf" / case / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1  # sharded, and the index names every tensor's shard
    exported = {}
    for shard in shards:
        exported.update(load_file(out / shard))
    assert sorted(exported) == sorted(original) == sorted(index["weight_map"])
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert (out / "tokenizer_config.json").read_text() == TOKENIZER_CONFIG
    model, info = _load_hf(case, out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("case,tp,pp", LM_PARAMS, ids=[_tag(*p) for p in LM_PARAMS])
def test_megatron_logits_match_transformers(converted: Path, case, tp, pp):
    ref = torch.load(converted / "ref" / f"{case}.pt")
    got = torch.load(converted / "logits" / f"{_tag(case, tp, pp)}.pt")
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case,tp,pp", PARAMS, ids=[_tag(*p) for p in PARAMS])
def test_live_streaming_gives_every_rank_the_exact_hf_tensors(converted: Path, case, tp, pp):
    for rank in range(WORLD):
        report = json.loads((converted / "stream" / f"{_tag(case, tp, pp)}-rank{rank}.json").read_text())
        assert report["names_equal"] and not report["mismatched"], (rank, report)
        assert report["oversized"] == 0 and report["buckets"] > 1, (rank, report)


CROSS = [(case, tp, pp) for case, tp, pp in PARAMS if (tp, pp) != LAYOUTS[0]]


@pytest.mark.parametrize("case,tp,pp", CROSS, ids=[_tag(*p) for p in CROSS])
def test_checkpoint_imported_at_one_layout_loads_at_another(converted: Path, case, tp, pp):
    """(1,1) -> (2,1) -> (1,2) -> (2,2): TP=1 vs TP=2 also means a different vocab padding."""
    for rank in range(WORLD):
        report = json.loads((converted / "cross" / f"{_tag(case, tp, pp)}-rank{rank}.json").read_text())
        assert report["names_equal"] and not report["mismatched"], (rank, report)
