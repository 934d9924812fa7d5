"""Rollout and SCOPE metrics against hand-computed values."""

import pytest

from scope_mega.metrics import distinct_ngram_ratio, pass_at_k, rollout_metrics, scope_metrics
from scope_mega.scope import ScopeStats, Trajectory


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(5, 0, 3) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_distinct_4gram_ratio_by_hand():
    # 4-grams: (1,2,3,4), (2,3,4,5) | (1,2,3,4): 2 distinct of 3; none cross the two sequences
    assert distinct_ngram_ratio([[1, 2, 3, 4, 5], [1, 2, 3, 4]]) == pytest.approx(2 / 3)
    assert distinct_ngram_ratio([[1, 2, 3, 4], [5, 6, 7]]) == 1.0
    assert distinct_ngram_ratio([[1, 2, 3]]) is None
    assert distinct_ngram_ratio([list("abab")], n=2) == pytest.approx(2 / 3)


def t(text, correct, answer, ids):
    return Trajectory([0], ids, [0.0] * len(ids), text, float(correct), correct, 0, answer=answer)


def test_rollout_metrics():
    groups = [
        [
            t("a", True, "1", [1, 2, 3, 4]),
            t("b", True, "1", [1, 2, 3, 4]),
            t("c", False, "2", [9]),
            t("d", False, None, [9]),
        ],
        [t("e", False, "3", [5, 6, 7, 8, 9]), t("f", False, "3", [1])],
    ]
    sig = {"a": "p1", "b": "p2", "c": None, "d": None, "e": None, "f": None}
    m = rollout_metrics(groups, ks=(1, 2, 4), path_signature=lambda g, text: sig[text])
    assert m["rollout/accuracy"] == pytest.approx(2 / 6)
    assert m["rollout/pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["rollout/pass@2"] == pytest.approx((1 - 1 / 6 + 0.0) / 2)  # n=4 c=2: 1 - C(2,2)/C(4,2)
    assert m["rollout/pass@4"] == pytest.approx(1.0)  # the group of 2 is skipped
    assert m["rollout/distinct_paths"] == pytest.approx((2 + 0) / 2)
    assert m["rollout/distinct_4gram"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert m["rollout/distinct_answers"] == pytest.approx((2 + 1) / 2)
    assert "rollout/distinct_paths" not in rollout_metrics(groups)


def test_scope_metrics():
    stats = ScopeStats(
        failed=8,
        no_error=1,
        first_errors=[0, 1, 1, 3, 9, 12],
        candidates=4,
        selected=2,
        salvaged=2,
        prefix_fractions=[0.5, 0.25],
    )
    m = scope_metrics(stats, max_position=8)
    assert m["scope/salvage_rate_candidates"] == 0.5 and m["scope/salvage_rate_failed"] == 0.25
    assert m["scope/prefix_frac"] == pytest.approx(0.375)
    hist = {k: v for k, v in m.items() if k.startswith("scope/first_error/")}
    assert hist == {
        "scope/first_error/0": 1,
        "scope/first_error/1": 2,
        "scope/first_error/3": 1,
        "scope/first_error/8+": 2,
    }
    assert "scope/salvage_rate_candidates" not in scope_metrics(ScopeStats())


def test_weighted_mean_counts_only_parts_with_the_key():
    from scope_mega.metrics import weighted_mean

    parts = [({"a": 1.0, "b": 4.0}, 3), ({"a": 0.0}, 1), ({}, 5)]
    assert weighted_mean(parts) == {"a": 0.75, "b": 4.0}


def test_merge_stats_adds_counts_and_concatenates_lists():
    from scope_mega.metrics import merge_stats

    one = ScopeStats(failed=3, first_errors=[0, 2], candidates=1, salvaged=1, prefix_fractions=[0.5])
    two = ScopeStats(failed=2, no_error=1, first_errors=[1], selected=2, rejected=1)
    merged = merge_stats([one, two])
    assert merged == ScopeStats(
        failed=5,
        no_error=1,
        first_errors=[0, 2, 1],
        candidates=1,
        selected=2,
        rejected=1,
        salvaged=1,
        prefix_fractions=[0.5],
    )
    assert one.first_errors == [0, 2]  # inputs untouched
