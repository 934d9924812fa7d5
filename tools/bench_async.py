"""Benchmark partial rollouts: the synchronous loop against `rl.max_staleness=1`, on CPU with vLLM.

Both arms start from the same SFT checkpoint: the demo's policy (examples/tiny_cpu.yaml) after
`--sft-steps` of SFT, then `--steps` RL steps (GRPO: SCOPE off, so a step is rollouts and the update)
with vLLM in process, the demo's 4 PPO mini-batches (so both arms run the old-logprob forward), at
temperature 1 (decoupled PPO compares the engine's logprobs with the trainer's untempered ones). The
workload's tail: the SFT'd policy ends most Countdown answers within ~25 tokens, a step's longest
response runs 1.5-2x the mean (engine idle fraction 0.1-0.4), and the synchronous step waits for it.
The partial arm generates in segments of `--segment` tokens with `--extra` groups more in flight.

The arms run `--repeats` times each, interleaved (sync, partial, sync, partial, ...), since this
machine's speed drifts by tens of percent over minutes. Printed for each arm: trained tokens per
second over all steps (the trained responses' tokens / the steps' wall time; both arms train
prompts_per_step x group_size samples a step) and its ratio to the synchronous arm's, the rollout
phase's seconds per step, the engine's idle fraction (decode slots left empty while each call's
longest response runs) and the trainer's waiting fraction (the step's time in rollouts), the
truncated fraction, the staleness histogram of the trained tokens, and the held-out accuracy (greedy
and avg@8 on the demo's 100 eval problems) after the same number of trained samples.

    .venv/bin/python tools/bench_async.py      # ~12 min on 2 cores
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
PARTIAL = ["rl.max_staleness=1", "loss.tis_cap=2"]


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "scope_mega.cli", *args], env=env, cwd=REPO, capture_output=True
    )
    if proc.returncode:
        sys.exit(proc.stderr.decode(errors="replace")[-3000:])


def summary(run_dirs: list[Path]) -> dict[str, float]:
    """An arm's throughput over all its runs' steps, its mean waiting and idle fractions, staleness
    and truncation per step, and its held-out accuracy at the end (the mean of its runs)."""
    rows = [[m for m in read_metrics(d) if m["stage"] == "rl"] for d in run_dirs]
    steps = [m for r in rows for m in r if "loss" in m]
    finals = [[m for m in r if "eval/greedy_acc" in m][-1] for r in rows]
    seconds = sum(m["timing_s/step"] for m in steps)

    def mean(key: str, default: float | None = None) -> float:
        """Over the steps that have `key` (a partial step without generation has no idle fraction)."""
        values = [m.get(key, default) for m in steps]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    return {
        "tokens_per_s": sum(m["tokens_per_s"] * m["timing_s/step"] for m in steps) / seconds,
        "step_s": seconds / len(steps),
        "rollout_s": mean("timing_s/generate"),
        "engine_idle": mean("rollout/engine_idle_frac"),
        "trainer_wait": mean("timing/trainer_wait_frac"),
        "truncated": mean("rollout/truncated_frac"),
        "rollout_acc": mean("rollout/accuracy"),
        "stale_0": mean("async/staleness_0", 1.0),
        "stale_1": mean("async/staleness_1", 0.0),
        "greedy": sum(m["eval/greedy_acc"] for m in finals) / len(finals),
        "avg@8": sum(m["eval/avg@8"] for m in finals) / len(finals),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/bench_async")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--segment", type=int, default=32, help="rl.partial_segment of the partial arm")
    parser.add_argument("--extra", type=int, default=8, help="rl.extra_prompts of the partial arm")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, interleaved")
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
    arms = {
        "sync": [],
        "partial k=1": [*PARTIAL, f"rl.partial_segment={args.segment}", f"rl.extra_prompts={args.extra}"],
    }
    runs: dict[str, list[Path]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits both arms
        for arm, overrides in arms.items():
            run_dir = out / f"{arm.split()[0]}_{repeat}"
            print(f"{arm}, run {repeat + 1}/{args.repeats}: {args.steps} RL steps -> {run_dir}", flush=True)
            cli("train", CONFIG, f"run_dir={run_dir}", *rl, *overrides, "checkpoint.resume=false")
            runs[arm].append(run_dir)
    results = {arm: summary(dirs) for arm, dirs in runs.items()}
    base = results["sync"]["tokens_per_s"]
    keys = list(results["sync"])
    print(f"\n{'arm':<12}" + "".join(f"{k:>13}" for k in keys) + f"{'ratio':>8}")
    for arm, r in results.items():
        print(f"{arm:<12}" + "".join(f"{r[k]:>13.4g}" for k in keys) + f"{r['tokens_per_s'] / base:>8.3f}")


if __name__ == "__main__":
    main()
