"""vLLM on a CUDA device: sleep releases GPU memory and wake restores it (weights before the KV
cache), sync parity holds across sleep; one trainer RL step with vLLM, recording the peak memory
of each phase; and the memory plan against what a 1B model's RL steps use, with vLLM and with the
transformers engine. Skipped without CUDA, and those with vLLM without vLLM; run with
`pytest -q tests/gpu` on a GPU machine after `pip install -e '.[gpu]'`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from _requires import NEEDS_VLLM
from _shapes import ONE_B

from scope_mega.rollout import SamplingParams, make_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
PROMPT = [5, 6, 7, 8, 9]


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _mismatch(model, completion) -> float:
    ids = torch.tensor([PROMPT + completion.token_ids], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1 : -1].double()
    ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(PROMPT) :, None])[:, 0]
    return (ref.cpu() - torch.tensor(completion.logprobs, dtype=torch.float64)).abs().max().item()


@NEEDS_VLLM
def test_sleep_frees_memory_and_sync_parity_holds_across_it(tmp_path):
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    a.save_pretrained(tmp_path)
    engine = make_engine(
        "vllm", tmp_path, decode=str, eos_token_ids=[], dtype="float32", gpu_memory_utilization=0.3
    )
    sampling = SamplingParams(n=2, max_new_tokens=16, seed=1)
    awake = _free()
    engine.sleep()
    asleep = _free()
    assert asleep - awake > 1 << 30, f"sleep released only {(asleep - awake) / 2**20:.0f} MiB"
    torch.manual_seed(1)
    b = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).cuda().eval()
    engine.update_weights((n, p.detach()) for n, p in b.named_parameters())  # wakes the weights only
    weights_only = _free()
    assert weights_only > awake + (1 << 30), "updating the weights must not bring the KV cache back"
    engine.wake_up()
    assert abs(_free() - awake) < 256 << 20, "wake_up restores what sleep released"
    (out,) = engine.generate([PROMPT], sampling)
    assert max(_mismatch(b, c) for c in out) < 1e-4


@NEEDS_VLLM
def test_one_rl_step_with_vllm_records_phase_memory(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "scope_mega.cli",
        "train",
        str(REPO / "examples/tiny_cpu.yaml"),
        f"run_dir={run}",
        "device=cuda",
        "wandb_mode=disabled",
        "rl.steps=1",
        "rl.init_from=random",  # no SFT stage first
        "rl.dynamic_sampling=off",  # every step updates, whatever the untrained policy earns
        "rl.eval_interval=0",
        "rl.num_eval_problems=8",
        "rollout.engine=vllm",
        "rollout.vllm_gpu_memory_utilization=0.3",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (step,) = [m for m in rows if m.get("stage") == "rl" and "loss" in m]
    assert step["rollout_mismatch"] < 1e-2  # bf16 engine and trainer
    peaks = {k: v for k, v in step.items() if k.startswith("memory/")}
    print(json.dumps(peaks, indent=1))
    assert {"memory/rollout_peak_gib", "memory/update_peak_gib"} <= peaks.keys()


ONE_B_RL = [
    *ONE_B,
    "rl.steps=2",
    "rl.init_from=random",  # no SFT stage first
    "rl.dynamic_sampling=off",  # every step updates, whatever the untrained policy earns
    "rl.eval_interval=0",
    "rl.num_eval_problems=8",
]


ENGINES = {  # rollout engine -> its overrides
    "hf": ["rollout.engine=hf"],
    "vllm": ["rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.3"],
}


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=NEEDS_VLLM)])
def test_plan_against_measured_memory_for_a_1b_model(tmp_path, engine):
    """Two RL steps of a 1.1B model with the rollout engine and offload (rl.offload=auto is on for
    CUDA); each phase's device memory in use at its end (`memory/<phase>_used_gib`, the engine included)
    must stay within the dry-run plan's total for that phase on this GPU. Prints both, for the record."""
    from scope_mega.plan import GIB, PHASES, make_plan
    from scope_mega.validation import load_config

    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "device=cuda", "wandb_mode=disabled", *ONE_B_RL, *ENGINES[engine]]
    cmd = [sys.executable, "-m", "scope_mega.cli", "train", str(REPO / "examples/tiny_cpu.yaml"), *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if m.get("stage") == "rl" and "loss" in m]
    cfg = load_config(REPO / "examples/tiny_cpu.yaml", overrides)
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    plan = make_plan(cfg, "cuda", world_size=1, gpu_memory_gib=total)
    for phase in PHASES:
        planned = plan.phase_total(phase) / GIB
        used = max(m[f"memory/{phase}_used_gib"] for m in steps)
        peak = max(m[f"memory/{phase}_peak_gib"] for m in steps)
        print(f"{phase:8s} plan {planned:6.2f} GiB  used {used:6.2f} GiB  trainer peak {peak:6.2f} GiB")
        assert used <= planned, f"{phase}: {used:.2f} GiB in use, the plan said {planned:.2f}"
