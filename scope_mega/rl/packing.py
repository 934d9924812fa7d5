"""Micro-batching by token budget, and right-padding of variable-length sequences.

A micro-batch is padded to its longest member, so it costs ``rows * longest`` token slots; packing
keeps that within ``max_tokens`` while grouping similar lengths to keep padding low.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


def pack_by_token_budget(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split sequence indices into micro-batches with ``len(batch) * max(length) <= max_tokens``.

    First-fit-decreasing: indices sorted by length, longest first (ties by index, so the result is
    deterministic), each placed in the first micro-batch with room. Because items arrive in
    decreasing length, a micro-batch's longest member is its first, and once one is full no later
    item fits it, so first-fit reduces to filling micro-batches one after another. Micro-batches
    come out longest first; within one, indices are in decreasing length.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    for i, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {i} has length {length}; lengths must be >= 1")
        if length > max_tokens:
            raise ValueError(
                f"sequence {i} has length {length}, longer than the micro-batch token budget {max_tokens}"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass
class PackingStats:
    """Cost of a packing: ``slots`` = sum over micro-batches of rows * longest; waste = pad / slots."""

    num_micro_batches: int
    tokens: int
    slots: int

    @property
    def pad_tokens(self) -> int:
        return self.slots - self.tokens

    @property
    def waste(self) -> float:
        return self.pad_tokens / self.slots if self.slots else 0.0


def packing_stats(lengths: list[int], batches: list[list[int]]) -> PackingStats:
    """Token, slot and padding counts of ``batches`` (indices into ``lengths``)."""
    tokens = sum(lengths[i] for batch in batches for i in batch)
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    return PackingStats(num_micro_batches=len(batches), tokens=tokens, slots=slots)


def pad_right(sequences: list[Tensor], pad_value: float = 0) -> tuple[Tensor, Tensor]:
    """Stack 1-D tensors into ``[B, max_len]``, right-padded with ``pad_value``.

    Returns the padded tensor and a bool mask ``[B, max_len]``, True on real (non-pad) positions.
    """
    if not sequences:
        raise ValueError("pad_right needs at least one sequence")
    for i, seq in enumerate(sequences):
        if seq.dim() != 1:
            raise ValueError(f"sequence {i} must be 1-D, got shape {tuple(seq.shape)}")
    lengths = torch.tensor([seq.numel() for seq in sequences], device=sequences[0].device)
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=pad_value)
    mask = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
    return padded, mask
