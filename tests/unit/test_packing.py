"""Token-budget packing and right-padding."""

import random

import pytest
import torch

from scope_mega.rl.packing import pack_by_token_budget, packing_stats, pad_right


def test_pack_hand_example():
    lengths = [5, 3, 8, 2, 7, 3]
    # decreasing: 8(2) 7(4) 5(0) 3(1) 3(5) 2(3); budget 16:
    # [2, 4] -> 2*8 = 16; [0, 1, 5] -> 3*5 = 15 (a 4th would be 20); [3] -> 2
    batches = pack_by_token_budget(lengths, 16)
    assert batches == [[2, 4], [0, 1, 5], [3]]
    stats = packing_stats(lengths, batches)
    assert (stats.num_micro_batches, stats.tokens, stats.slots, stats.pad_tokens) == (3, 28, 33, 5)
    assert stats.waste == pytest.approx(5 / 33)


def test_pack_budget_coverage_determinism():
    rng = random.Random(0)
    for _ in range(50):
        budget = rng.randint(8, 200)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(0, 40))]
        batches = pack_by_token_budget(lengths, budget)
        assert batches == pack_by_token_budget(list(lengths), budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            assert b and len(b) * max(lengths[i] for i in b) <= budget


def test_pack_equal_lengths_no_waste():
    batches = pack_by_token_budget([4] * 7, 12)
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]
    assert packing_stats([4] * 7, batches).waste == 0.0


def test_pack_errors():
    with pytest.raises(ValueError, match=r"sequence 1 has length 20, longer than .* budget 16"):
        pack_by_token_budget([3, 20], 16)
    with pytest.raises(ValueError, match="length 0"):
        pack_by_token_budget([3, 0], 16)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_token_budget([3], 0)
    assert pack_by_token_budget([], 16) == []


def test_pad_right():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    padded, mask = pad_right(seqs, pad_value=-1)
    assert padded.tolist() == [[1, 2, 3], [4, -1, -1], [5, 6, -1]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert padded.dtype == torch.int64 and mask.dtype == torch.bool
    with pytest.raises(ValueError, match="1-D"):
        pad_right([torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        pad_right([])


def test_trainer_gives_a_sequence_longer_than_the_budget_its_own_micro_batch():
    """A salvaged trajectory can outgrow `rl.max_tokens_per_micro_batch`: it is trained alone, not refused."""
    from scope_mega.trainer import Sample, to_micro_batches

    samples = [Sample([1] * 3, [2] * n, [1.0] * n, [False] * n, [0.0] * n) for n in (4, 30, 5)]
    micro = to_micro_batches(samples, 1, pad_id=0, max_tokens=16)
    assert [tuple(b["input_ids"].shape) for b in micro] == [(1, 32), (2, 7)]
    assert [int(b["tokens"]) for b in micro] == [32, 13]
