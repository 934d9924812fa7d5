"""Benchmark the RL update at long sequence lengths with activation recompute none / selective / full:
tokens/s, the activation memory measured two ways, the planner's activation figure beside them, and
the recompute's time overhead and memory saving as ratios against `none` measured in the same run.

    .venv/bin/python tools/bench_long_context.py                                   # cpu-23m, 1k 2k 4k
    .venv/bin/python tools/bench_long_context.py --preset cpu-40m --lengths 1024 2048 4096 8192
    .venv/bin/python tools/bench_long_context.py --lengths 2048 4096 --cp 1 2      # CP=2 on 2 processes
    python tools/bench_long_context.py --preset gpu-1b --device cuda --lengths 4096 8192 16384  # + MFU

Each (recompute, length) point builds the policy with `model.recompute` (full: uniform, 1 layer per
chunk), and trains it on micro-batches of one sequence of `length` positions (padded layout, the RL
policy loss with entropy, `train_step`): one warm-up step (it allocates the gradient buffers and Adam
states), then `--steps` timed steps; tokens/s is from the fastest. Memory, per point:
- `saved`: the bytes one micro-batch's forward (model and loss) keeps for its backward, measured with
  `runtime.activations.SavedActivations` (a saved-tensors hook summing the unique storages saved,
  parameters excluded; a storage released afterwards counts 0). Exact, and what the recompute changes.
- `peak`: the step's peak memory above the memory held before it (weights, gradient buffers, Adam
  states, all allocated by the warm-up step): on CUDA `torch.cuda.max_memory_allocated`; on CPU the
  process's resident set, sampled every millisecond by a thread while the step runs, after glibc is
  told to serve every block over 128 KiB by mmap (`mallopt(M_MMAP_THRESHOLD)`, which also stops the
  threshold from adapting) and to return freed memory (`malloc_trim`) before the baseline, so the
  resident set follows what tensors hold. It adds what the backward holds for a moment (gradients of
  the activations, the recomputed layer, the logits' gradient) and allocator slack. The mmap setting
  makes every large allocation fault its pages in (system time), in every mode alike: CPU tokens/s
  here are below `tools/bench_train_step.py`'s, and the time ratios are what to read.
- `plan`: `validation.checked_plan(cfg, target).phases["update"]["activations"]` for the same model,
  length and recompute (one sequence per micro-batch), which counts the stored activations, what one
  recompute holds while it runs, and the loss's logits buffers (`scope_mega.plan`'s docstring).
Ratios: `time x` = step time / none's; `saved x`, `peak x` = memory / none's, all at the same length.
MFU (CUDA): model FLOPs per step (6 N per token for the matmuls, N = layers' linear parameters plus the
output layer, and 12 L h s per token for attention; recompute's extra forward is not model FLOPs)
over the step time, against a GEMM of the model's shape measured in this run (as
`tools/bench_train_step.py`). On CPU no MFU is printed.

Structure: `measure_point` measures one (recompute, length) point on the current process group and
returns a `Point`; `measure_all` loops over them. `--cp 1` runs in this process (world size 1); a
context-parallel size N > 1 runs the same points on N spawned processes (`runtime.spawn.spawn_local`,
each CP rank holding its load-balanced length / N positions of every sequence) and reports rank 0's
`Point`s, with `cp` set: memory is per rank, tokens/s the whole group's (on a 2-core CPU the ranks
share the cores, so read CP's time as a check that it runs, not as a speed-up).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

PRESETS = {
    # 23 M parameters, 12.6 M of them the embedding and output layer: at a few thousand tokens the
    # layers' activations (the local attention's s x s term above all) outweigh the logits
    "cpu-23m": dict(hidden=384, layers=6, heads=6, kv_heads=6, ffn=1024, vocab=16384),
    # tools/bench_train_step.py's llama-41m
    "cpu-40m": dict(hidden=512, layers=8, heads=8, kv_heads=8, ffn=1376, vocab=32000),
    # TinyLlama's shape (1.1 B): a GPU preset
    "gpu-1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000),
}
MODES = ("none", "selective", "full")
PROMPT = 32  # prompt tokens of each sequence (no loss on them); the rest is the response
GIB = 1024**3


@dataclass
class Point:
    mode: str
    length: int  # positions per sequence (one sequence per micro-batch)
    cp: int
    seconds: float  # fastest timed step
    tokens: int  # real tokens per step
    saved: int  # bytes one micro-batch's forward keeps for backward
    peak: int  # the step's peak memory above its start
    plan: int  # the planner's update activations
    mfu: float | None  # CUDA only


def hf_config(preset: dict, positions: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=preset["hidden"],
        intermediate_size=preset["ffn"],
        num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"],
        num_key_value_heads=preset["kv_heads"],
        vocab_size=preset["vocab"],
        max_position_embeddings=positions,
        tie_word_embeddings=False,
    )


def run_config(hf: dict, mode: str, length: int, device: str, cp: int = 1):
    """The `RunConfig` whose update trains micro-batches of one `length`-position sequence (Countdown:
    the whole sequence is `rollout.max_new_tokens` to the planner) with `model.recompute=mode`."""
    from scope_mega.config import RunConfig, from_dict

    return from_dict(
        RunConfig,
        dict(
            device=device,
            model=dict(hf_config=hf, recompute=mode, recompute_method="uniform", recompute_num_layers=1),
            parallel=dict(cp=cp),
            rollout=dict(max_new_tokens=length),
            rl=dict(micro_batch_size=1, prompts_per_step=1, group_size=2),
            scope=dict(guide="oracle"),  # no guide model to size: the update's figure is the policy's
        ),
    )


def planned_activations(hf: dict, mode: str, length: int, device: torch.device, cp: int = 1) -> int:
    """The planner's update-phase activations per GPU for this point (`validation.checked_plan`; where a
    CUDA plan is refused as not fitting, the same `plan.make_plan` figure, with the refusal printed)."""
    from scope_mega.config import ConfigError
    from scope_mega.plan import make_plan
    from scope_mega.validation import checked_plan

    cfg = run_config(hf, mode, length, device.type, cp)
    try:
        plan = checked_plan(cfg, target=device.type, world_size=cp)
    except ConfigError as e:
        if device.type != "cuda":
            raise
        print(f"plan refused ({e}); its update activations are still printed")
        plan = make_plan(cfg, target=device.type, world_size=cp)
    return int(plan.phases["update"]["activations"])


# ----------------------------------------------------------------------------- memory


def tune_glibc_for_rss() -> None:
    """Large blocks by mmap at a fixed threshold, so freed tensors leave the resident set (CPU only)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (setting it also disables the adaptive threshold)
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest resident set seen while the context runs, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def timed_peak(step, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above the start) of one call of `step`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss()
    with PeakRSS() as rss:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    return seconds, rss.peak - base


def saved_by_forward(chunk, vocab: int, batch: dict, loss_fn) -> int:
    """Bytes one micro-batch's forward and loss keep for backward (the graph is dropped after)."""
    from scope_mega.models.logprobs import token_logprobs, vocab_parallel_entropy
    from scope_mega.models.pipeline import model_forward, on_device
    from scope_mega.runtime.activations import SavedActivations

    batch = on_device(dict(batch), chunk)
    with SavedActivations(chunk) as saved:
        logits = model_forward(chunk, batch)
        entropy = vocab_parallel_entropy(logits, vocab)
        loss_fn(token_logprobs(logits, batch["targets"], vocab), batch, entropy)
        return saved.nbytes()


# ----------------------------------------------------------------------------- one point


def micro_batches(vocab: int, length: int, sequences: int, cp: int = 1) -> list[dict]:
    """`sequences` micro-batches of one random sequence of `length` positions each (the policy loss's
    fields: advantages, rollout logprobs, masks)."""
    from scope_mega.rl.batch import Sample, to_micro_batches

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(sequences):
        response = torch.randint(3, vocab, (length - PROMPT + 1,), generator=g).tolist()
        prompt = torch.randint(3, vocab, (PROMPT,), generator=g).tolist()
        n = len(response)
        samples.append(Sample(prompt, response, [0.5] * n, [False] * n, [-1.0] * n))
    return to_micro_batches(samples, 1, 0, cp=cp)  # padded to 2 x CP; `models.context_parallel` splits it


def model_flops(preset: dict, length: int, tokens: int) -> float:
    """Model FLOPs of one step (module docstring)."""
    h, f, layers = preset["hidden"], preset["ffn"], preset["layers"]
    kv = h * preset["kv_heads"] // preset["heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + preset["vocab"] * h
    return 6 * linear * tokens + 12 * layers * h * length * tokens


def reference_gemm_flops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul in `dtype`, best of 5 after a warm-up."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def measure_point(args, mode: str, length: int, device: torch.device, cp: int = 1) -> Point:
    """Build the policy with `model.recompute=mode`, warm up, time `args.steps` update steps on
    micro-batches of one `length`-position sequence, and measure its memory (module docstring)."""
    from megatron.core import parallel_state

    from scope_mega.config import OptimConfig, RunConfig
    from scope_mega.models.context_parallel import split_batch
    from scope_mega.models.gpt import build_gpt_model
    from scope_mega.rl.update import rl_loss
    from scope_mega.train_step import setup_training, train_step

    preset = PRESETS[args.preset]
    hf = hf_config(preset, max(args.lengths))
    cfg = run_config(hf, mode, length, device.type, cp)
    model, spec = build_gpt_model(cfg.model, cfg.parallel, device)
    state = setup_training(model, spec.vocab_size, OptimConfig(lr=1e-6), cfg.parallel, args.steps + 1)
    rank = parallel_state.get_context_parallel_rank()
    batches = [split_batch(b, cp, rank) for b in micro_batches(preset["vocab"], length, args.sequences, cp)]
    loss = partial(rl_loss, RunConfig().loss)

    def step() -> None:
        train_step(state, batches, loss, need_entropy=True)

    step()  # warm-up
    timings = [timed_peak(step, device) for _ in range(args.steps)]
    seconds = min(t for t, _ in timings)
    saved = saved_by_forward(state.model[0], spec.vocab_size, batches[0], loss)
    tokens = sum(int(b["tokens"]) for b in batches)
    mfu = None
    if device.type == "cuda":
        gemm = reference_gemm_flops(length, preset["hidden"], preset["ffn"], spec.dtype, device)
        mfu = model_flops(preset, length, tokens) / seconds / gemm
    return Point(
        mode=mode,
        length=length,
        cp=cp,
        seconds=seconds,
        tokens=tokens,
        saved=saved,
        peak=max(p for _, p in timings),
        plan=planned_activations(hf, mode, length, device, cp),
        mfu=mfu,
    )


# ----------------------------------------------------------------------------- report


def table(points: list[Point]) -> str:
    """One row per point, with its ratios against `none` at the same length and CP."""
    base = {(p.length, p.cp): p for p in points if p.mode == "none"}
    mfu = any(p.mfu is not None for p in points)
    head = (
        f"{'length':>7} {'cp':>2} {'recompute':>9} {'tokens/s':>9} {'time x':>6} "
        f"{'saved MiB':>9} {'saved x':>7} {'peak MiB':>9} {'peak x':>6} {'plan MiB':>9} {'plan/saved':>10} "
        f"{'plan/peak':>9}" + (f" {'MFU':>6}" if mfu else "")
    )
    rows = [head]
    for p in points:
        ref = base.get((p.length, p.cp))
        time_x = f"{p.seconds / ref.seconds:6.2f}" if ref else f"{'-':>6}"
        saved_x = f"{p.saved / ref.saved:7.2f}" if ref else f"{'-':>7}"
        peak_x = f"{p.peak / ref.peak:6.2f}" if ref else f"{'-':>6}"
        row = (
            f"{p.length:>7} {p.cp:>2} {p.mode:>9} {p.tokens / p.seconds:>9,.0f} {time_x} "
            f"{p.saved / 2**20:>9,.1f} {saved_x} {p.peak / 2**20:>9,.1f} {peak_x} {p.plan / 2**20:>9,.1f} "
            f"{p.plan / p.saved:>10.2f} {p.plan / max(p.peak, 1):>9.2f}"
        )
        rows.append(row + (f" {p.mfu:>6.1%}" if p.mfu is not None else ""))
    return "\n".join(rows)


def measure_all(args, cp: int) -> list[Point]:
    """Every (length, mode) point on this process group (world size `cp`, every rank a CP rank)."""
    from scope_mega.runtime.distributed import destroy_distributed, init_distributed

    device = init_distributed(cp=cp, device=args.device, seed=0)
    points = []
    for length in args.lengths:
        for mode in args.modes:
            points.append(measure_point(args, mode, length, device, cp))
            print(f"measured cp={cp} {mode} at {length}: {points[-1].seconds:.2f} s", flush=True)
    destroy_distributed()
    return points


def _cp_worker(args, cp: int, out: str) -> None:
    """`measure_all` on one rank of a spawned CP group; rank 0 writes its points to `out` (JSON)."""
    if args.device == "cpu":
        tune_glibc_for_rss()
    points = measure_all(args, cp)
    if os.environ["RANK"] == "0":
        Path(out).write_text(json.dumps([asdict(p) for p in points]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu-23m")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    parser.add_argument("--sequences", type=int, default=1, help="micro-batches (one sequence each) per step")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per point, after one warm-up")
    parser.add_argument(
        "--cp", type=int, nargs="+", default=[1], help="context-parallel sizes (>1: that many processes)"
    )
    args = parser.parse_args()
    if min(args.lengths) <= PROMPT:
        parser.error(f"--lengths must exceed the {PROMPT}-token prompt")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29518")
    if args.device == "cpu":
        tune_glibc_for_rss()

    from scope_mega.runtime.spawn import spawn_local

    points = []
    for cp in args.cp:
        if cp == 1:
            points += measure_all(args, 1)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            spawn_local(_cp_worker, cp, args, cp, f"{tmp}/points.json")
            points += [Point(**p) for p in json.loads(Path(f"{tmp}/points.json").read_text())]
    dtype = "bf16" if args.device == "cuda" else "fp32"
    print(f"\n{args.preset} on {args.device} ({dtype}), {args.sequences} sequence(s) of each length per step")
    print(table(points))


if __name__ == "__main__":
    main()
