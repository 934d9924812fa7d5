"""Benchmark partial rollouts: the synchronous loop against `rl.max_staleness=1`, on CPU with vLLM.

One run measures both arms, one after the other on this machine, from the same SFT checkpoint:
the demo's policy (examples/tiny_cpu.yaml) warm-started by `--sft-steps` of SFT, then `--steps` RL
steps (GRPO: SCOPE off, so the step is rollouts and the update alone) with vLLM in process. The
workload has a long tail: the SFT'd policy ends most Countdown answers within ~25 tokens, while a few
responses wander to the `--max-new-tokens` limit, and the synchronous step waits for them.

Printed: for each arm its trained tokens per second over all steps (the trained responses' tokens /
the steps' wall time; equal samples per step in both arms), the ratio against the synchronous arm,
the engine's idle fraction (decode slots left empty while the longest response runs) and the
trainer's waiting fraction (the step's time spent in rollouts), the staleness histogram of the
trained tokens, and the held-out accuracy (greedy and avg@8 on the demo's 100 eval problems) after
the same number of trained samples.

    .venv/bin/python tools/bench_async.py                     # ~15 min on 2 cores
    .venv/bin/python tools/bench_async.py --steps 10 --sft-steps 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scope_mega.logging import read_metrics  # noqa: E402

CONFIG = str(REPO / "examples" / "tiny_cpu.yaml")
ARMS = {
    "sync": [],
    "partial k=1": ["rl.max_staleness=1", "loss.tis_cap=2", "rl.extra_prompts=8", "rl.partial_segment=16"],
}


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "scope_mega.cli", *args], env=env, cwd=REPO, capture_output=True
    )
    if proc.returncode:
        sys.exit(proc.stderr.decode(errors="replace")[-3000:])


def summary(run_dir: Path) -> dict[str, float]:
    """The arm's throughput, waiting and idle fractions, staleness and final held-out accuracy."""
    rows = [m for m in read_metrics(run_dir) if m["stage"] == "rl"]
    steps = [m for m in rows if "loss" in m]
    final = [m for m in rows if "eval/greedy_acc" in m][-1]
    seconds = sum(m["timing_s/step"] for m in steps)
    out = {
        "tokens_per_s": sum(m["tokens_per_s"] * m["timing_s/step"] for m in steps) / seconds,
        "step_s": seconds / len(steps),
        "engine_idle": sum(m["rollout/engine_idle_frac"] for m in steps) / len(steps),
        "trainer_wait": sum(m["rollout/trainer_wait_frac"] for m in steps) / len(steps),
        "truncated": sum(m["rollout/truncated_frac"] for m in steps) / len(steps),
        "rollout_acc": sum(m["rollout/accuracy"] for m in steps) / len(steps),
        "greedy": final["eval/greedy_acc"],
        "avg@8": final["eval/avg@8"],
    }
    for j in (0, 1):
        values = [m.get(f"async/staleness_{j}", 1.0 - j) for m in steps]
        out[f"stale_{j}"] = sum(values) / len(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/bench_async")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    out = Path(args.out)
    common = [f"seed={args.seed}", "wandb_mode=disabled"]
    sft = out / "sft"
    if not (sft / "checkpoints" / "latest").exists():
        print(f"SFT, {args.sft_steps} steps -> {sft}", flush=True)
        cli("sft", CONFIG, f"run_dir={sft}", f"sft.steps={args.sft_steps}", *common)
    rl = [
        f"rl.init_from={sft / 'checkpoints'}",
        f"rl.steps={args.steps}",
        "rollout.engine=vllm",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "scope.enabled=false",
        "rl.dynamic_sampling=off",  # every arm trains prompts_per_step x group_size samples a step
        "rl.eval_interval=0",
        *common,
    ]
    results = {}
    for arm, overrides in ARMS.items():
        run_dir = out / arm.split()[0]
        print(f"{arm}: {args.steps} RL steps -> {run_dir}", flush=True)
        cli("train", CONFIG, f"run_dir={run_dir}", *rl, *overrides, "checkpoint.resume=false")
        results[arm] = summary(run_dir)
    base = results["sync"]["tokens_per_s"]
    keys = list(results["sync"])
    print(f"\n{'arm':<12}" + "".join(f"{k:>13}" for k in keys) + f"{'ratio':>8}")
    for arm, r in results.items():
        print(f"{arm:<12}" + "".join(f"{r[k]:>13.4g}" for k in keys) + f"{r['tokens_per_s'] / base:>8.3f}")


if __name__ == "__main__":
    main()
