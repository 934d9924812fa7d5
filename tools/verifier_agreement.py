"""Agreement of `MathVerifier` with the reference grader's labels on real model responses.

    python tools/verifier_agreement.py [--data PATH] [--timeout S]

Reads math_cot_100.jsonl (100 MATH problems x 8 responses, `gt` reference, `score` labels), prints the
agreement rate and every disagreement grouped by category, so a regression shows what kind of answer broke.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from scope_mega.rewards.math_verifier import MathVerifier, MathVerifierConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "data" / "verifier" / "math_cot_100.jsonl"


@dataclass(frozen=True)
class Disagreement:
    """One response where the verifier and the label differ."""

    idx: int
    sample: int
    gt: str
    extracted: str | None
    reason: str
    label: bool


@dataclass(frozen=True)
class Report:
    """Agreement over all responses and the disagreements."""

    total: int
    agree: int
    disagreements: list[Disagreement]

    @property
    def rate(self) -> float:
        return self.agree / self.total


def category(d: Disagreement) -> str:
    """Coarse kind of a disagreement, from the verdict reason and the look of the answers."""
    text = f"{d.gt} {d.extracted or ''}"
    if d.reason in ("no_answer", "too_long"):
        return "extraction failure"
    if d.reason in ("timeout", "parse_error", "error"):
        return d.reason.replace("_", " ")
    if "{,}" in text or re.search(r"\d,\d{3}(?!\d)", text):
        return "number formatting (thousands separators)"
    if re.search(r"\\infty|\\cup", text) or re.fullmatch(r"\s*[\[(].*,.*[\])]\s*", d.gt):
        return "interval"
    if re.search(r"\d\s*\\frac", text):
        return "mixed number"
    if re.search(r"\\text|\\mbox|\^\s*\\?circ|%|\\\$|\d\s*[a-zA-Z]{2,}", text):
        return "units / text decoration"
    if not re.search(r"\d", d.gt):
        return "text answer"
    return "other"


def run(data: Path, config: MathVerifierConfig) -> Report:
    """Verify every response of `data` in one batch and compare with its `score` label."""
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    items = [(row, j) for row in rows for j in range(len(row["response"]))]
    with MathVerifier(config) as verifier:
        results = verifier.verify_batch(
            [row["response"][j] for row, j in items], [row["gt"] for row, _ in items]
        )
    disagreements = [
        Disagreement(row["idx"], j, row["gt"], res.extracted, res.reason, bool(row["score"][j]))
        for (row, j), res in zip(items, results)
        if res.correct != bool(row["score"][j])
    ]
    return Report(total=len(items), agree=len(items) - len(disagreements), disagreements=disagreements)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="math_cot_100.jsonl")
    parser.add_argument(
        "--timeout", type=float, default=MathVerifierConfig.timeout_s, help="seconds per item"
    )
    args = parser.parse_args(argv)

    start = time.perf_counter()
    report = run(args.data, MathVerifierConfig(timeout_s=args.timeout))
    elapsed = time.perf_counter() - start
    print(f"agreement: {report.agree}/{report.total} = {report.rate:.2%}  ({elapsed:.1f} s)")

    groups: dict[str, list[Disagreement]] = defaultdict(list)
    for d in report.disagreements:
        groups[category(d)].append(d)
    for name, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"\n{name}: {len(members)}")
        for d in members:
            verdict = "label correct, verifier incorrect" if d.label else "label incorrect, verifier correct"
            print(
                f"  idx={d.idx} #{d.sample}  gt={d.gt!r}  extracted={d.extracted!r}  {d.reason}  ({verdict})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
