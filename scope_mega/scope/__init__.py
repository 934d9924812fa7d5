"""SCOPE: PRM-located first errors, guided continuation of correct prefixes, and the baselines."""

from scope_mega.scope.config import ScopeConfig
from scope_mega.scope.dense import dense_token_advantages, outcome_advantages, prm_dense_advantages
from scope_mega.scope.guides import (
    Continuation,
    ContinuationEngine,
    CountdownOracleGuide,
    EngineGuide,
    Guide,
    GuideOutput,
    GuideRequest,
    ReferenceGuide,
    make_guide,
)
from scope_mega.scope.prm import PRM, CountdownOraclePRM, first_error_step, score_responses
from scope_mega.scope.rectify import ScopeStats, assemble_salvaged, rectify_groups, select_candidates
from scope_mega.scope.steps import StepSpan, TokenizerLike, segment_steps, split_steps
from scope_mega.scope.trajectory import PromptInfo, Trajectory

__all__ = [
    "PRM",
    "Continuation",
    "ContinuationEngine",
    "CountdownOracleGuide",
    "CountdownOraclePRM",
    "EngineGuide",
    "Guide",
    "GuideOutput",
    "GuideRequest",
    "PromptInfo",
    "ReferenceGuide",
    "ScopeConfig",
    "ScopeStats",
    "StepSpan",
    "TokenizerLike",
    "Trajectory",
    "assemble_salvaged",
    "dense_token_advantages",
    "first_error_step",
    "make_guide",
    "outcome_advantages",
    "prm_dense_advantages",
    "rectify_groups",
    "score_responses",
    "segment_steps",
    "select_candidates",
    "split_steps",
]
