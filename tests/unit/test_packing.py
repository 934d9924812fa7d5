"""Token-budget packing, in the padded and the THD layout, and the trainer's micro-batches."""

import random

import pytest

from scope_mega.rl.packing import cu_seqlens, pack_by_token_budget


def test_pack_hand_example():
    lengths = [5, 3, 8, 2, 7, 3]
    # decreasing: 8(2) 7(4) 5(0) 3(1) 3(5) 2(3); budget 16:
    # [2, 4] -> 2*8 = 16; [0, 1, 5] -> 3*5 = 15 (a 4th would be 20); [3] -> 2
    assert pack_by_token_budget(lengths, 16) == [[2, 4], [0, 1, 5], [3]]
    # THD, by the sum: 8 -> A (8); 7 -> A (15); 5 -> B (5); 3 -> B (8, A has 1 left); 3 -> B (11);
    # 2 -> B (13): first fit, not next fit, and 2 rows of 15 and 13 tokens instead of 16 + 15 + 2 slots
    assert pack_by_token_budget(lengths, 16, thd=True) == [[2, 4], [0, 1, 5, 3]]


def test_cu_seqlens_hand_example():
    assert cu_seqlens([3, 5, 2], align=4) == ([0, 3, 8, 10, 12], 2)  # the padding is a segment of its own
    assert cu_seqlens([4, 4], align=4) == ([0, 4, 8], 0)
    assert cu_seqlens([5]) == ([0, 5], 0)
    with pytest.raises(ValueError, match="align"):
        cu_seqlens([5], align=0)


def test_pack_budget_coverage_determinism():
    rng = random.Random(0)
    for _ in range(50):
        budget = rng.randint(8, 200)
        lengths = [rng.randint(1, budget) for _ in range(rng.randint(0, 40))]
        for thd in (False, True):
            batches = pack_by_token_budget(lengths, budget, thd=thd)
            assert batches == pack_by_token_budget(list(lengths), budget, thd=thd)
            assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
            for b in batches:
                cost = sum(lengths[i] for i in b) if thd else len(b) * max(lengths[i] for i in b)
                assert b and cost <= budget


def test_pack_equal_lengths_no_waste():
    assert pack_by_token_budget([4] * 7, 12) == [[0, 1, 2], [3, 4, 5], [6]]
    assert pack_by_token_budget([4] * 7, 12, thd=True) == [[0, 1, 2], [3, 4, 5], [6]]


def test_pack_errors():
    with pytest.raises(ValueError, match=r"sequence 1 has length 20, longer than .* budget 16"):
        pack_by_token_budget([3, 20], 16)
    with pytest.raises(ValueError, match="length 0"):
        pack_by_token_budget([3, 0], 16)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_token_budget([3], 0)
    assert pack_by_token_budget([], 16) == []


def test_trainer_gives_a_sequence_longer_than_the_budget_its_own_micro_batch():
    """A salvaged trajectory can outgrow `rl.max_tokens_per_micro_batch`: it is trained alone, not refused."""
    from scope_mega.rl.batch import Sample, to_micro_batches

    samples = [Sample([1] * 3, [2] * n, [1.0] * n, [False] * n, [0.0] * n) for n in (4, 30, 5)]
    micro = to_micro_batches(samples, 1, pad_id=0, max_tokens=16)
    assert [tuple(b["input_ids"].shape) for b in micro] == [(1, 32), (2, 7)]
    assert [int(b["tokens"]) for b in micro] == [32, 13]


def test_thd_micro_batch_by_hand():
    """Two samples end to end in one row, rounded up to 8 positions: targets shifted within each
    sample, positions restarting at each, the loss inputs on the response only, the padding its own
    segment with no loss; the budget of 9 holds both (5 + 3 = 8 positions once rounded to 8)."""
    import torch

    from scope_mega.rl.batch import Sample, to_micro_batches

    a = Sample(
        [1, 2, 3], [4, 5, 6], [0.5, 0.5, 0.5], [False, True, False], [-1.0, 0.0, -3.0], [0.0, -2.0, 0.0]
    )
    b = Sample([7, 8], [9, 10], [-1.0, -1.0], [False, False], [-4.0, -5.0], in_loss=False)
    (mb,) = to_micro_batches([a, b], 1, pad_id=0, max_tokens=9, thd=True, align=8)
    rows = {key: value.tolist() for key, value in mb.items()}
    assert rows["input_ids"] == [[1, 2, 3, 4, 5, 7, 8, 9]]
    assert rows["targets"] == [[2, 3, 4, 5, 6, 8, 9, 10]]
    assert rows["position_ids"] == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert rows["cu_seqlens"] == [0, 5, 8] and mb["cu_seqlens"].dtype == torch.int32
    assert rows["seq_index"] == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert rows["on_mask"] == [[0, 0, 1, 0, 1, 0, 0, 0]]  # b is out of the loss (rl.overlong=mask)
    assert rows["off_mask"] == [[0, 0, 0, 1, 0, 0, 0, 0]]
    assert rows["advantages"] == [[0, 0, 0.5, 0.5, 0.5, 0, -1, -1]]
    assert rows["rollout_logprobs"] == [[0, 0, -1, 0, -3, 0, -4, -5]]
    assert rows["guide_logprobs"] == [[0, 0, 0, -2, 0, 0, 0, 0]]
    assert rows["tokens"] == 8
    # a budget that rounds down to 8 still holds them; the rounding pads a 7-position pair to 8
    (mb,) = to_micro_batches([a, Sample([7], [9, 10], [1.0] * 2, [False] * 2, [0.0] * 2)], 1, 0, 9, True, 8)
    assert mb["cu_seqlens"].tolist() == [0, 5, 7, 8] and mb["seq_index"].tolist() == [[0] * 5 + [1, 1, 2]]
    assert mb["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 9, 0]] and mb["tokens"].item() == 7
    with pytest.raises(ValueError, match="token budget"):
        to_micro_batches([a], 1, 0, None, thd=True)
    bad = Sample([1, 2], [3, 4], [0.5], [False, False], [0.0, 0.0])  # one advantage for two tokens
    for thd in (False, True):
        with pytest.raises(ValueError, match="a sample has 1 advantages for 2 response tokens"):
            to_micro_batches([bad], 1, 0, 16, thd=thd)
