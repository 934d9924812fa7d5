"""The SCOPE guard: a watch on the policy's own rollout accuracy while rectification is on.

Salvaged trajectories can lower the accuracy of the policy's own rollouts (docs/results.md, "SCOPE on
a weak policy"). The guard keeps the moving mean of `rollout/accuracy` (the sampled rollouts, before
any rectification) over the last `scope.guard_window` steps, and its best value since the window
first filled. It trips when the mean falls below (1 - `scope.guard_drop`) x best. With
`scope.guard="pause"` a trip pauses rectification for `scope.guard_pause_steps` steps; the best is
then forgotten, so the watch restarts from the accuracy the pause leaves. With "log" it only reports.

Its state is a small dict in the checkpointed trainer state (`TrainerState.extra["scope_guard"]`), so
a resumed run watches and pauses as the straight run does. Metrics: `guard/acc_mean`,
`guard/acc_best`, `guard/acc_ratio` (mean over best), `guard/tripped` (1 on a step whose mean is
below the line; under "pause" only the step that starts a pause), `guard/paused` (1 on every step
without rectification because of the guard).
"""

from __future__ import annotations

from typing import Any

from scope_mega.logging import is_rank0
from scope_mega.scope.config import ScopeConfig

KEY = "scope_guard"


def rectification_paused(extra: dict[str, Any], step: int) -> bool:
    """Whether the guard has paused rectification at RL step `step` (0-based, the step being run)."""
    return step < extra.get(KEY, {}).get("paused_until", 0)


def watch_accuracy(extra: dict[str, Any], step: int, accuracy: float, cfg: ScopeConfig) -> dict[str, float]:
    """Record step `step`'s rollout accuracy in the guard's state and return its metrics; on a trip
    with `guard="pause"`, pause rectification for the next `guard_pause_steps` steps."""
    if cfg.guard == "off":
        return {}
    state = extra.setdefault(KEY, {"recent": [], "best": None, "paused_until": 0})
    out = {"guard/paused": float(rectification_paused(extra, step))}
    recent = (state["recent"] + [accuracy])[-cfg.guard_window :]
    state["recent"] = recent
    if len(recent) < cfg.guard_window:
        return out
    mean = sum(recent) / len(recent)
    best = mean if state["best"] is None else max(state["best"], mean)
    tripped = best > 0 and mean < (1 - cfg.guard_drop) * best and not out["guard/paused"]
    state["best"] = best
    if tripped and not state.get("below") and is_rank0():
        action = (
            f"pausing rectification for {cfg.guard_pause_steps} steps" if cfg.guard == "pause" else "logged"
        )
        print(
            f"[scope guard] step {step + 1}: the policy's own rollout accuracy ({mean:.4f}, mean of "
            f"{cfg.guard_window} steps) fell below {1 - cfg.guard_drop:.2f} x its best ({best:.4f}): "
            f"{action} (scope.guard={cfg.guard}; see docs/results.md, 'SCOPE on a weak policy')",
            flush=True,
        )
    state["below"] = bool(tripped)
    if tripped and cfg.guard == "pause":
        state.update(paused_until=step + 1 + cfg.guard_pause_steps, best=None, recent=[], below=False)
    return out | {
        "guard/acc_mean": mean,
        "guard/acc_best": best,
        "guard/acc_ratio": mean / best if best > 0 else 1.0,
        "guard/tripped": float(tripped),
    }
