"""Run logging: a console progress bar, `metrics.jsonl` in the run directory, and wandb (offline default).

Only global rank 0 logs. `metrics.jsonl` holds one JSON object per step; on resume the lines past the
resumed step (written by a run that died after its last checkpoint) are dropped so the file never
holds a step twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
            self.wandb_run.log({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)
        self.bar.update(step - self.bar.n)
        shown = {k: f"{metrics[k]:.4g}" for k in self.bar_keys if isinstance(metrics.get(k), (int, float))}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
