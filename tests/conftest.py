"""Shared pytest fixtures: the repository's own data folder."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """`data/` of this checkout: the math benchmarks and the verifier's graded responses."""
    return REPO_ROOT / "data"
