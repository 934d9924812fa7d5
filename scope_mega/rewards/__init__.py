"""Verifiers: turn a response and a reference answer into a reward."""

from scope_mega.rewards.base import RewardConfig, Verifier, VerifyResult
from scope_mega.rewards.math_verifier import MathVerifier, MathVerifierConfig, extract_answer

__all__ = ["MathVerifier", "MathVerifierConfig", "RewardConfig", "Verifier", "VerifyResult", "extract_answer"]
