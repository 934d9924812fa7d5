"""tools/plot_metrics.py's report: the RL time-by-phase table, summed from the trainer's timing_s/*."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plot_metrics_tool", ROOT / "tools" / "plot_metrics.py")
plot_metrics = importlib.util.module_from_spec(_spec)
sys.modules["plot_metrics_tool"] = plot_metrics
_spec.loader.exec_module(plot_metrics)

ROWS = [
    {"stage": "sft", "step": 10, "timing_s/step": 99.0},  # another stage: not counted
    {"stage": "rl", "step": 0, "eval/greedy_acc": 0.1, "timing_s/eval": 2.0},
    {"stage": "rl", "step": 1, "timing_s/rollout": 3.0, "timing_s/update": 4.0, "timing_s/step": 8.0},
    {"stage": "rl", "step": 2, "timing_s/rollout": 1.0, "timing_s/update": 2.0, "timing_s/step": 4.0},
]


def test_phase_table_sums_each_phase_and_the_rest():
    # steps 12 s + eval 2 s = 14 s; rollout 4, update 6, eval 2, other 12 - 10 = 2
    assert plot_metrics.phase_table(ROWS) == [
        "## RL time by phase",
        "",
        "| phase | seconds | share |",
        "|---|---|---|",
        "| rollout | 4.0 | 28.6% |",
        "| update | 6.0 | 42.9% |",
        "| eval | 2.0 | 14.3% |",
        "| other | 2.0 | 14.3% |",
        "| all | 14.0 | 100% |",
        "",
    ]


def test_report_has_the_table_and_none_without_rl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    text = plot_metrics.report(tmp_path, []).read_text()
    assert "| rollout | 4.0 | 28.6% |" in text
    assert plot_metrics.phase_table(ROWS[:1]) == []
