"""Rollout engines behind one protocol (`engine`), and per-step weight sync from the trainer."""

from scope_mega.rollout.engine import (
    Completion,
    RolloutEngine,
    SamplingParams,
    WeightSyncError,
    WeightUpdate,
    continue_from,
)
from scope_mega.rollout.factory import make_engine
from scope_mega.rollout.weight_sync import sync_weights

__all__ = [
    "Completion",
    "RolloutEngine",
    "SamplingParams",
    "WeightSyncError",
    "WeightUpdate",
    "continue_from",
    "make_engine",
    "sync_weights",
]
