"""FP8 on a CUDA device: vLLM serves `scope-mega export-fp8`'s output; FP8 rollouts
(`rollout.vllm_fp8_weights`, vLLM quantizing each synced bf16 weight on reload) against bf16 rollouts;
a Transformer Engine FP8 training run against bf16. Each prints its figures for the record. Skipped
without CUDA, vLLM or Transformer Engine; run with `pytest -q -s tests/gpu` after
`pip install -e '.[gpu]'`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _requires import NEEDS_TE, NEEDS_VLLM
from _shapes import ONE_B

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "weights"))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _cli(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scope_mega.cli", *args], env=ENV, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _rl_steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if m.get("stage") == "rl" and "loss" in m]


@NEEDS_VLLM
def test_vllm_serves_the_fp8_export(tmp_path):
    """The export loads in vLLM as a modelopt FP8 checkpoint, every Linear in FP8, and its sampled
    tokens' logprobs stay close to the bf16 model's (figures printed)."""
    from _tiny_models import countdown_policy_run

    from scope_mega.rollout import SamplingParams, make_engine

    # head size 64 and dims that FP8 GEMMs accept (multiples of 16)
    src = countdown_policy_run(
        tmp_path, 8, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    _cli("export-fp8", str(src["run"]), "--out", str(tmp_path / "fp8"))
    engine = make_engine(
        "vllm", tmp_path / "fp8", decode=str, eos_token_ids=[], dtype="bfloat16", gpu_memory_utilization=0.2
    )
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(src["hf"], dtype=torch.bfloat16).cuda().eval()
    diffs = []
    for ids in src["prompts"]:
        prompt = ids[0].tolist()
        (out,) = engine.generate([prompt], SamplingParams(n=4, max_new_tokens=24, seed=0))
        for c in out:
            full = torch.tensor([prompt + list(c.token_ids)], device="cuda")
            with torch.no_grad():
                logits = ref(full).logits[0, len(prompt) - 1 : -1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, full[0, len(prompt) :, None])[:, 0].cpu()
            diffs.append((lp - torch.tensor(c.logprobs)).abs())
    diff = torch.cat(diffs)
    print(f"FP8 export in vLLM vs bf16 HF: |dlogprob| mean {diff.mean():.4f} max {diff.max():.4f}")
    assert diff.mean() < 0.1


@NEEDS_VLLM
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_fp8_rollout_mismatch(tmp_path, fp8):
    """Two RL steps of the tiny config with vLLM rollouts in bf16 or FP8 weights (vLLM's own
    quantization on every reload); the logged rollout/trainer logprob mismatch is printed, and FP8's
    stays bounded (loss.tis_cap is the correction for it)."""
    run = tmp_path / "run"
    _cli(
        "train", str(REPO / "examples/tiny_cpu.yaml"), f"run_dir={run}", "device=cuda", "wandb_mode=disabled",
        "model.params_dtype=bfloat16", "rl.steps=2", "rl.eval_interval=0", "rl.num_eval_problems=8",
        "rl.dynamic_sampling=off", "rl.init_from=random",
        "rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.3", f"rollout.vllm_fp8_weights={fp8}",
    )  # fmt: skip
    steps = _rl_steps(run)
    mismatch = [m["rollout_mismatch"] for m in steps]
    print(f"rollout_mismatch with {'FP8' if fp8 else 'bf16'} rollout weights: {mismatch}")
    assert all(x < (0.5 if fp8 else 1e-2) for x in mismatch)


@NEEDS_TE
def test_te_fp8_training_tracks_bf16(tmp_path):
    """20 SFT steps of a 1.1B model from the same initialisation with Transformer Engine in bf16 and in
    FP8 (delayed scaling, hybrid format): the mean relative loss difference over the steps stays
    within 5%. The losses are printed."""
    losses = {}
    for fp8 in (False, True):
        run = tmp_path / f"fp8_{fp8}"
        _cli(
            "sft", str(REPO / "examples/tiny_cpu.yaml"), f"run_dir={run}", "device=cuda",
            "wandb_mode=disabled", "model.transformer_impl=te", f"model.fp8.enabled={fp8}", *ONE_B,
            "sft.steps=20", "sft.global_batch_size=32", "sft.micro_batch_size=16", "optim.lr=3e-4",
            "optim.warmup_steps=2", "log_interval=1",
        )  # fmt: skip
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[fp8] = [m["loss"] for m in rows if m.get("stage") == "sft" and "loss" in m]
    bf16, fp8 = torch.tensor(losses[False]), torch.tensor(losses[True])
    print(f"SFT loss bf16: {bf16.tolist()}\nSFT loss FP8:  {fp8.tolist()}")
    assert len(bf16) == len(fp8) >= 20
    assert ((fp8 - bf16).abs() / bf16).mean() < 0.05
