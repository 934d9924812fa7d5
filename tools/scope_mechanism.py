"""What SCOPE's updates are made of, per arm of a sweep (issue 29): tables and one figure.

    python tools/scope_mechanism.py SWEEP_OUT [--plot PNG] [--window 10] [--arms grpo,scope]

Reads every run of a `tools/sweep.py` output (`SWEEP_OUT/runs/ARM-sSEED/metrics.jsonl`) and prints,
per arm, mean ± std over seeds of each run's mean over its RL steps of:
- the policy's own rollout accuracy over the first and the last `window` steps;
- the batch mix (`mix/*`, `rl.parts.batch_mix`): each part's share of the trained tokens and its
  advantage mass, and the share of trained groups whose only success is salvaged;
- each part's gradient norm at the pre-update weights and the failure/salvaged cosine (`grad/*`,
  logged every `rl.grad_parts_interval` steps), and the steps the guard tripped.
`--plot` draws the rollout accuracy (moving mean over `window` steps, mean over seeds) per arm, and
the gradient norms per part and the advantage mass per part of each arm. `--arms` keeps those arms.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from scope_mega.logging import METRICS_FILE, read_metrics

PARTS = ("failure", "success", "prefix", "guide")


def _runs(out: Path) -> dict[str, list[list[dict]]]:
    """arm -> one list of RL step metrics per seed (steps with rollout metrics only)."""
    arms: dict[str, list[list[dict]]] = defaultdict(list)
    for rd in sorted((out / "runs").iterdir()):
        path = rd / METRICS_FILE
        if not path.exists():
            continue
        steps = [m for m in read_metrics(rd) if m.get("stage") == "rl" and "rollout/accuracy" in m]
        if steps:
            arms[rd.name.rsplit("-s", 1)[0]].append(steps)
    return dict(arms)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_summary(steps: list[dict], window: int) -> dict[str, float]:
    """One run's means over its steps."""
    acc = [m["rollout/accuracy"] for m in steps]
    out = {"acc_first": _mean(acc[:window]), "acc_last": _mean(acc[-window:]), "acc_all": _mean(acc)}
    tokens = [{p: m.get(f"mix/tokens/{p}", 0.0) for p in PARTS} for m in steps]
    totals = [max(1.0, sum(t.values())) for t in tokens]
    for p in PARTS:
        out[f"share_{p}"] = _mean([t[p] / n for t, n in zip(tokens, totals)])
        out[f"adv_{p}"] = _mean([m.get(f"mix/adv_mass/{p}", 0.0) for m in steps])
    groups = [
        (
            m.get("mix/groups/salvaged_only", 0.0),
            sum(m.get(f"mix/groups/{k}", 0.0) for k in ("own", "salvaged_only", "both")),
        )
        for m in steps
    ]
    out["salvaged_only_groups"] = sum(a for a, _ in groups) / max(1.0, sum(b for _, b in groups))
    for key in (*PARTS, "salvaged", "all", "cos_failure_salvaged"):
        values = [m[f"grad/{key}"] for m in steps if f"grad/{key}" in m]
        if values:
            out[f"grad_{key}"] = _mean(values)
    out["guard_tripped_steps"] = sum(m.get("guard/tripped", 0.0) for m in steps)
    return {k: v for k, v in out.items() if v is not None}


def _fmt(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def table(arms: dict[str, list[list[dict]]], keys: list[str], window: int) -> list[str]:
    """Markdown rows: arm, seeds, then mean ± std over seeds of each key."""
    lines = ["| arm | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm, runs in arms.items():
        sums = [run_summary(r, window) for r in runs]
        cells = [_fmt([s[k] for s in sums if k in s]) for k in keys]
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def _moving(values: list[float], window: int) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1)
        for i in range(len(values))
    ]


def plot(arms: dict[str, list[list[dict]]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm, runs in arms.items():
        n = min(len(r) for r in runs)
        curves = [_moving([m["rollout/accuracy"] for m in r[:n]], window) for r in runs]
        axes[0].plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)], label=arm)
    axes[0].set(
        title=f"policy's own rollout accuracy ({window}-step mean, mean over seeds)", xlabel="RL step"
    )
    axes[0].legend(fontsize=7)
    names = list(arms)
    width = 0.8 / len(names)
    for j, arm in enumerate(names):
        sums = [run_summary(r, window) for r in arms[arm]]
        grads = [statistics.fmean(s.get(f"grad_{p}", 0.0) for s in sums) for p in PARTS]
        advs = [statistics.fmean(s[f"adv_{p}"] for s in sums) for p in PARTS]
        xs = [i + j * width for i in range(len(PARTS))]
        axes[1].bar(xs, grads, width, label=arm)
        axes[2].bar(xs, advs, width, label=arm)
    for ax, title in ((axes[1], "gradient norm of each part"), (axes[2], "advantage mass of each part")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(PARTS))], PARTS)
        ax.set_title(title + " (mean over steps and seeds)")
    axes[2].axhline(0, color="black", linewidth=0.5)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--arms", help="comma-separated arms to keep (default: all)")
    args = parser.parse_args()
    arms = _runs(args.out)
    if args.arms:
        arms = {a: arms[a] for a in args.arms.split(",")}
    w = args.window
    print(
        "\n".join(
            table(
                arms, ["acc_first", "acc_last", "acc_all", "salvaged_only_groups", "guard_tripped_steps"], w
            )
        )
    )
    print()
    print("\n".join(table(arms, [f"share_{p}" for p in PARTS] + [f"adv_{p}" for p in PARTS], w)))
    print()
    grads = [f"grad_{p}" for p in (*PARTS, "salvaged", "all", "cos_failure_salvaged")]
    print("\n".join(table(arms, grads, w)))
    if args.plot:
        plot(arms, args.plot, w)


if __name__ == "__main__":
    main()
