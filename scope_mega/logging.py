"""Run logging: a console progress bar, `metrics.jsonl` in the run directory, and wandb (offline default).

Only global rank 0 logs. `metrics.jsonl` holds one JSON object per step; on resume the lines past the
resumed step (written by a run that died after its last checkpoint) are dropped so the file never
holds a step twice. A run killed while writing a line leaves it torn (no newline, not JSON): every
reader (`read_metrics`) keeps the whole lines before it and leaves it out, saying so in one line on
stderr, and a stage's logger rewrites the file at its start without it. A line that is not JSON
anywhere else is damage no crash leaves: `read_metrics` raises a `ValueError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl` in order ([] without one), a torn last line left out."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{n} is not JSON and is not the last line: damaged") from None
            print(
                f"{path}: left out its torn last line (a run stopped while writing it), kept the "
                f"{len(records)} whole lines before it: {line[:60]!r}",
                file=sys.stderr,
                flush=True,
            )
    return records


class MetricsLogger:
    """Progress bar + jsonl + wandb for one stage of a run (e.g. `sft`, `rl`)."""

    def __init__(
        self,
        run_dir: str | Path,
        stage: str,
        total_steps: int,
        start_step: int,
        config: dict[str, Any],
        wandb_mode: str = "offline",
        bar_keys: tuple[str, ...] = ("loss",),
    ) -> None:
        self.enabled = is_rank0()
        self.stage, self.bar_keys = stage, bar_keys
        self.path = Path(run_dir) / METRICS_FILE
        self.bar = None
        self.wandb_run = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the records up to the resumed step, a torn last line dropped: the file is rewritten whole
        kept = [m for m in read_metrics(run_dir) if m.get("stage") != stage or m["step"] <= start_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.path)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True)
        if wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project="scope-mega",
                dir=str(Path(run_dir)),
                mode=wandb_mode,
                config=config,
                name=f"{Path(run_dir).name}-{stage}",
                resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"stage": self.stage, "step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            numbers = {f"{self.stage}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb_run.log(numbers, step=step)  # lists (e.g. async/trained_positions): the jsonl only
        self.bar.update(step - self.bar.n)
        shown = {k: f"{metrics[k]:.4g}" for k in self.bar_keys if isinstance(metrics.get(k), (int, float))}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
