"""Rollout metrics (docs/design.md section 4): accuracy, pass@k, diversity, and SCOPE's salvage statistics;
and the step's telemetry: each phase's wall time (`timed`) and GPU memory (`phase_memory`).

Accuracy, pass@k and diversity describe the policy's own samples: compute them on the rollout groups
before rectification. Entropy, clip fraction, KL and rollout mismatch come from `rl.loss` metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch

from scope_mega.scope.rectify import ScopeStats
from scope_mega.scope.trajectory import Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        fail *= 1.0 - k / i
    return 1.0 - fail


def distinct_ngram_ratio(sequences: Sequence[Sequence[Hashable]], n: int = 4) -> float | None:
    """Distinct n-grams / all n-grams over `sequences` (n-grams never cross sequences); None when
    there is no n-gram at all."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rollout_metrics(
    groups: Sequence[Sequence[Trajectory]],
    ks: Sequence[int] = (1,),
    path_signature: Callable[[int, str], Hashable | None] | None = None,
) -> dict[str, float]:
    """`rollout/*` metrics of rollout groups; per-group quantities are averaged over groups.

    accuracy: fraction correct; pass@k: mean unbiased pass@k (groups smaller than k skipped);
    distinct_paths: distinct non-None `path_signature(group_index, response_text)` per group (e.g.
    `countdown.solution_path_signature` of the group's problem); distinct_4gram: distinct-4-gram
    ratio of a group's response token ids; distinct_answers: distinct non-None extracted answers.
    Metrics without data are left out.
    """
    flat = [t for group in groups for t in group]
    values: dict[str, float | None] = {"rollout/accuracy": _mean([float(t.correct) for t in flat])}
    for k in ks:
        values[f"rollout/pass@{k}"] = _mean(
            [pass_at_k(len(g), sum(t.correct for t in g), k) for g in groups if len(g) >= k]
        )
    if path_signature is not None:
        values["rollout/distinct_paths"] = _mean(
            [
                float(len({s for t in g if (s := path_signature(gi, t.response_text)) is not None}))
                for gi, g in enumerate(groups)
            ]
        )
    ratios = [distinct_ngram_ratio([t.response_ids for t in g], 4) for g in groups]
    values["rollout/distinct_4gram"] = _mean([r for r in ratios if r is not None])
    values["rollout/distinct_answers"] = _mean(
        [float(len({t.answer for t in g if t.answer is not None})) for g in groups]
    )
    return {k: v for k, v in values.items() if v is not None}


def scope_metrics(stats: ScopeStats, max_position: int = 8) -> dict[str, float]:
    """`scope/*` metrics of one rectification pass: counts, salvage rates (over candidates and over
    failed rollouts), mean prefix fraction of salvaged trajectories, and the first-error histogram
    (`scope/first_error/<k>` counts, positions >= `max_position` pooled in `<max_position>+`)."""
    out = {
        "scope/failed": float(stats.failed),
        "scope/no_error": float(stats.no_error),
        "scope/candidates": float(stats.candidates),
        "scope/selected": float(stats.selected),
        "scope/guide_none": float(stats.guide_none),
        "scope/rejected": float(stats.rejected),
        "scope/salvaged": float(stats.salvaged),
        "scope/capped": float(stats.capped),
    }
    if stats.candidates:
        out["scope/salvage_rate_candidates"] = stats.salvaged / stats.candidates
    if stats.failed:
        out["scope/salvage_rate_failed"] = stats.salvaged / stats.failed
    if stats.prefix_fractions:
        out["scope/prefix_frac"] = _mean(stats.prefix_fractions)
    for k in stats.first_errors:
        key = f"scope/first_error/{k}" if k < max_position else f"scope/first_error/{max_position}+"
        out[key] = out.get(key, 0.0) + 1.0
    return out


def weighted_mean(parts: Sequence[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Per key, the mean of the parts' values weighted by their weights (e.g. metrics of each
    data-parallel replica and its number of groups); a key counts only the parts that have it."""
    totals: dict[str, list[float]] = {}
    for values, weight in parts:
        for key, value in values.items():
            total = totals.setdefault(key, [0.0, 0.0])
            total[0] += weight * value
            total[1] += weight
    return {key: s / w for key, (s, w) in totals.items() if w > 0}


def merge_stats(parts: Sequence[ScopeStats]) -> ScopeStats:
    """One `ScopeStats` for several rectification passes (e.g. every replica's)."""
    merged = ScopeStats()
    for stats in parts:
        for f in dataclasses.fields(ScopeStats):
            setattr(merged, f.name, getattr(merged, f.name) + getattr(stats, f.name))
    return merged


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, phase: str) -> Iterator[None]:
    """Add the wall time of the block to `timings["timing_s/<phase>"]` (nothing when `timings` is None)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            key = f"timing_s/{phase}"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def phase_memory(phase: str, device: torch.device) -> dict[str, float]:
    """On CUDA, this rank's GPU memory in the phase that just ended: the peak the PyTorch allocator
    held (the trainer; vLLM's own pool is not in it) and the device's use at its end (everything,
    vLLM included), in GiB; then the peak is reset for the next phase. Nothing on CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    out = {
        f"memory/{phase}_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        f"memory/{phase}_used_gib": (total - free) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats()
    return out
