"""Shared pytest fixtures: where the team's shared data lives."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the checkout (CI places it there); override with SCOPE_MEGA_SHARED_DATA."""
    path = Path(os.environ.get("SCOPE_MEGA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"shared data not found at {path}; set SCOPE_MEGA_SHARED_DATA")
    return path
