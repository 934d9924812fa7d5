"""A fresh clone stands alone: no tracked file names a path outside the repository (the team's old
sibling data folder, its environment override, an absolute machine path, or a `Path(__file__)` that
climbs above the checkout), and the data the tests read is tracked."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not name them itself.
FORBIDDEN = ("../" + "shared", "SCOPE_MEGA_" + "SHARED_DATA", "/" + "work/", "/" + "home/")
# `Path(__file__).resolve().parents[k]` / `Path(__file__).parent.parent...`: k levels above the file
UP_INDEX = re.compile(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
UP_CHAIN = re.compile(r"__file__\)(?:\.resolve\(\))?((?:\.parent\b)+)")
ROOT_PARENT = re.compile(r"\b\w*ROOT\w*\.parent\b|\bREPO\.parent\b")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in out.split("\0") if name]


def outside_references(name: str, text: str) -> list[str]:
    """`name:line: fragment` for every reference in `text` (the file `name`) to a path outside the
    repository."""
    top = len(Path(name).parts) - 1  # parents[top] of a file at `name` is the repository root
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        hits = [f for f in FORBIDDEN if f in line]
        hits += [m.group(0) for m in UP_INDEX.finditer(line) if int(m.group(1)) > top]
        hits += [m.group(0) for m in UP_CHAIN.finditer(line) if m.group(1).count(".parent") - 1 > top]
        hits += [m.group(0) for m in ROOT_PARENT.finditer(line)]
        found += [f"{name}:{number}: {hit}" for hit in hits]
    return found


def test_no_tracked_file_names_a_path_outside_the_repository():
    found = []
    for name in tracked_files():
        path = REPO / name
        if path.is_file():
            found += outside_references(name, path.read_text(encoding="utf-8", errors="replace"))
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_the_checker_sees_each_kind_of_escape():
    """Each pattern fires, and the in-repository spellings do not."""
    bad = [
        "x = ROOT / '.." + "/shared/data'",
        "os.environ['SCOPE_MEGA_" + "SHARED_DATA']",
        "open('/" + "work/x')",
        "Path(__file__).resolve().parents" + "[3]",
        "Path(__file__)" + ".parent" * 4,
        "REPO_ROOT" + ".parent / 'data'",
    ]
    for line in bad:
        assert len(outside_references("tests/unit/x.py", line)) == 1, line
    good = [
        "Path(__file__).resolve().parents[2] / 'data'",
        "Path(__file__).parent.parent.parent",
        "ROOT / 'data'",
    ]
    for line in good:
        assert outside_references("tests/unit/x.py", line) == [], line


def test_the_data_the_tests_read_is_tracked():
    tracked = set(tracked_files())
    for name in ("aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k"):
        assert f"data/benchmarks/{name}.jsonl" in tracked
    assert {"data/README.md", "data/verifier/math_cot_100.jsonl"} <= tracked
