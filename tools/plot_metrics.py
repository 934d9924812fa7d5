"""Render a run's `metrics.jsonl` to PNG curves, and optionally a short markdown report.

    python tools/plot_metrics.py RUN_DIR [--report]

Writes RUN_DIR/plots/<stage>_<metric>.png for the main training curves, plots/rl_timing.png (each RL
step's wall time stacked by phase), plots/rl_rollouts.png (the engine's idle and the trainer's waiting
fraction; with partial rollouts the staleness histogram and the groups carried over) and, with
--report, RUN_DIR/report.md: held-out results before and after each stage, with the plots linked. A
torn last line of metrics.jsonl (a run killed while writing it) is left out with a one-line note
(`scope_mega.logging.read_metrics`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scope_mega.logging import METRICS_FILE, read_metrics  # noqa: E402

CURVES = {
    "sft": ["loss", "lr"],
    "rl": [
        "reward",
        "rollout/accuracy",
        "scope/salvaged",
        "loss",
        "entropy",
        "eval/greedy_acc",
        "eval/pass@8",
    ],
}


# the RL step's phases as the trainer times them (timing_s/<phase>), in the order they run
PHASES = ["rollout", "verify", "scope", "offload", "ref_logprobs", "old_logprobs", "update", "sync"]


def plot(run_dir: Path) -> list[Path]:
    """One PNG per (stage, metric) that has data; returns the written paths."""
    rows, out = read_metrics(run_dir), []
    (run_dir / "plots").mkdir(exist_ok=True)
    for stage, names in CURVES.items():
        for name in names:
            pts = [(m["step"], m[name]) for m in rows if m.get("stage") == stage and name in m]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
            ax.set(xlabel="step", ylabel=name, title=f"{stage}: {name}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = run_dir / "plots" / f"{stage}_{name.replace('/', '_').replace('@', 'at')}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out.append(path)
    timing = plot_timing(rows, run_dir / "plots" / "rl_timing.png")
    rollouts = plot_rollouts(rows, run_dir / "plots" / "rl_rollouts.png")
    return out + [p for p in (timing, rollouts) if p]


def plot_rollouts(rows: list[dict], path: Path) -> Path | None:
    """Where rollouts wait: the engine's idle and the trainer's waiting fraction per RL step; with
    partial rollouts (`async/*`), also the trained tokens' staleness histogram and the groups
    carried over, regenerated and dropped."""
    steps = [m for m in rows if m.get("stage") == "rl" and "timing/trainer_wait_frac" in m]
    if not steps:
        return None
    x = [m["step"] for m in steps]
    partial = any("async/staleness_0" in m for m in steps)
    fig, axes = plt.subplots(1, 3 if partial else 1, figsize=(13 if partial else 5, 3.4), squeeze=False)
    ax = axes[0][0]
    for key, label in (
        ("rollout/engine_idle_frac", "engine idle"),
        ("timing/trainer_wait_frac", "trainer waits"),
    ):
        ax.plot(x, [m.get(key, float("nan")) for m in steps], label=label)
    ax.set(xlabel="step", ylabel="fraction", ylim=(0, 1), title="rl: idle engine, waiting trainer")
    ax.legend(fontsize=7)
    if partial:
        ax = axes[0][1]
        ages = sorted(
            int(k.rsplit("_", 1)[1]) for k in steps[0] if k.startswith("async/staleness_") and k[-1].isdigit()
        )
        bottom = [0.0] * len(steps)
        for j in ages:
            height = [m.get(f"async/staleness_{j}", 0.0) for m in steps]
            ax.bar(x, height, bottom=bottom, label=f"{j} steps old")
            bottom = [b + h for b, h in zip(bottom, height)]
        ax.set(xlabel="step", ylabel="fraction of trained tokens", title="rl: staleness of trained tokens")
        ax.legend(fontsize=7)
        ax = axes[0][2]
        for key in ("async/carried", "async/finished_waiting", "async/regenerated", "async/dropped"):
            ax.plot(x, [m.get(key, 0.0) for m in steps], label=key.split("/")[1])
        ax.set(xlabel="step", ylabel="groups (per replica)", title="rl: groups in flight")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_timing(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars of each RL step's phase times, with the whole step's wall time as a line."""
    steps = [m for m in rows if m.get("stage") == "rl" and "timing_s/step" in m]
    if not steps:
        return None
    x = [m["step"] for m in steps]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    bottom = [0.0] * len(steps)
    for phase in PHASES:
        height = [m.get(f"timing_s/{phase}", 0.0) for m in steps]
        if any(height):
            ax.bar(x, height, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, height)]
    ax.plot(x, [m["timing_s/step"] for m in steps], "k.-", label="step")
    ax.set(xlabel="step", ylabel="seconds", title="rl: time per step by phase")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def phase_table(rows: list[dict]) -> list[str]:
    """Markdown lines: the RL stage's seconds per phase summed over all steps, with evaluation."""
    rl = [m for m in rows if m.get("stage") == "rl"]
    totals = {p: sum(m.get(f"timing_s/{p}", 0.0) for m in rl) for p in [*PHASES, "eval"]}
    steps = sum(m.get("timing_s/step", 0.0) for m in rl)
    if not steps:
        return []
    whole = steps + totals["eval"]
    totals["other"] = steps - sum(v for p, v in totals.items() if p != "eval")  # logging, packing, ...
    lines = ["## RL time by phase", "", "| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {p} | {v:.1f} | {v / whole:.1%} |" for p, v in totals.items() if v > 0.05]
    return lines + [f"| all | {whole:.1f} | 100% |", ""]


def report(run_dir: Path, plots: list[Path]) -> Path:
    """Markdown summary: held-out evaluation before/after, last training metrics, plots."""
    rows = read_metrics(run_dir)
    lines = [f"# Run report: {run_dir.name}", ""]
    sft_eval = [m for m in rows if m.get("stage") == "sft" and "heldout_acc_greedy" in m]
    if sft_eval:
        m = sft_eval[-1]
        lines += [
            "## SFT warm-start",
            f"After {m['step']} steps: held-out greedy accuracy {m['heldout_acc_greedy']:.3f}, "
            f"sampled (T=1) {m['heldout_acc_sampled']:.3f}.",
            "",
        ]
    rl_eval = [m for m in rows if m.get("stage") == "rl" and any(k.startswith("eval/") for k in m)]
    if rl_eval:
        keys = [k for k in rl_eval[0] if k.startswith("eval/")]
        lines += [
            "## RL (held-out evaluation)",
            "",
            "| step | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for m in rl_eval:
            lines.append(
                f"| {m['step']} | " + " | ".join(f"{m.get(k, float('nan')):.3f}" for k in keys) + " |"
            )
        lines.append("")
    lines += phase_table(rows)
    lines += ["## Curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    tmp = path.with_name("report.md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--report", action="store_true", help="also write RUN_DIR/report.md")
    args = parser.parse_args()
    if not (args.run_dir / METRICS_FILE).is_file():
        raise SystemExit(f"error: {args.run_dir}/{METRICS_FILE} not found; is this a run directory?")
    plots = plot(args.run_dir)
    print(f"wrote {len(plots)} plots to {args.run_dir / 'plots'}")
    if args.report:
        print(f"wrote {report(args.run_dir, plots)}")


if __name__ == "__main__":
    main()
