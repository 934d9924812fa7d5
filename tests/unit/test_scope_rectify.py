"""SCOPE steps, PRM, guides and rectification on Countdown (oracle PRM and guide) and on hand-made
token layouts (a step boundary inside a token)."""

import math
import random

import pytest

from scope_mega.data import countdown
from scope_mega.data.countdown import Problem
from scope_mega.data.tokenizer import train_tokenizer
from scope_mega.rewards.base import RewardConfig, Verifier, VerifyResult, make_result
from scope_mega.scope import (
    PRM,
    CountdownOracleGuide,
    CountdownOraclePRM,
    EngineGuide,
    PromptInfo,
    ReferenceGuide,
    ScopeConfig,
    Trajectory,
    first_error_step,
    rectify_groups,
    segment_steps,
    select_candidates,
    split_steps,
)

P30 = Problem((3, 7, 9), 30)
GOOD = "7 * 3 = 21\n21 + 9 = 30\nanswer: 30"
WRONG_STEP1 = "7 * 3 = 21\n21 + 7 = 28\nanswer: 28"  # 7 was consumed: step 1 is wrong
WRONG_STEP0 = "5 * 6 = 30\nanswer: 30"  # 5 is not available
NO_ERROR = "7 * 3 = 21"  # truncated: every step right, no answer
P25 = Problem((2, 3, 4, 5), 25)
K2 = "3 + 2 = 5\n5 * 4 = 20\n20 + 4 = 24\nanswer: 24"  # steps 0, 1 right, step 2 wrong
K1 = "3 + 2 = 5\n5 + 4 = 10\n10 + 5 = 15\nanswer: 15"  # step 1 leaves 25 unreachable
K1_OTHER = "3 + 2 = 5\n5 - 4 = 1\nanswer: 1"

TOY = ScopeConfig(step_delimiter="\n", guide="oracle")


class CountdownVerifier(Verifier):
    """Reference = the Countdown prompt."""

    def verify(self, response_text: str, reference: str) -> VerifyResult:
        lines = countdown.split_steps(response_text)
        value = countdown.parse_answer(lines[-1]) if lines else None
        ok = countdown.is_correct(countdown.parse_prompt(reference), response_text)
        extracted = None if value is None else str(value)
        return make_result(
            ok, extracted, "ok" if ok else "mismatch" if extracted else "no_answer", RewardConfig()
        )


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    texts = [p.prompt() + countdown.random_solution(p, rng) for p in countdown.make_problems(300, 0)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=128)


def rollout(tok, problem, text, group_id=0):
    prompt_ids = [tok.bos_id, *tok.encode(problem.prompt())]
    ids = tok.encode(text) + [tok.eos_id]
    ok = countdown.is_correct(problem, text)
    logprobs = [-0.001 * (i + 1) - 0.1 * group_id for i in range(len(ids))]  # distinct, traceable
    return Trajectory(prompt_ids, ids, logprobs, text, float(ok), ok, group_id)


def run(tok, problem, texts, cfg=TOY, guide=None, prompt=None):
    group = [rollout(tok, problem, t) for t in texts]
    prompt = prompt or PromptInfo(problem.prompt(), problem.prompt())
    groups, stats = rectify_groups(
        [group],
        [prompt],
        cfg,
        tokenizer=tok,
        verifier=CountdownVerifier(),
        guide=guide or CountdownOracleGuide(seed=0),
        prm=CountdownOraclePRM(),
    )
    return group, groups[0], stats


# ----------------------------------------------------------------------------- steps


class PieceTokenizer:
    """Greedy longest match over a fixed piece list; id 0 is EOS (zero-width)."""

    eos_id = 0

    def __init__(self, pieces):
        self.pieces = ["", *pieces]

    def encode(self, text):
        ids, pos = [], 0
        while pos < len(text):
            i = max(
                (i for i, p in enumerate(self.pieces) if p and text.startswith(p, pos)),
                key=lambda i: len(self.pieces[i]),
            )
            ids.append(i)
            pos += len(self.pieces[i])
        return ids

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def token_offsets(self, ids):
        out, pos = [], 0
        for i in ids:
            out.append((pos, pos + len(self.pieces[i])))
            pos += len(self.pieces[i])
        return out


PIECES = PieceTokenizer(["2\n3", *"0123456789\nans+="])


def test_step_spans_with_a_boundary_inside_a_token():
    text = "12\n34\nans"
    ids = PIECES.encode(text) + [PIECES.eos_id]
    assert [PIECES.pieces[i] for i in ids] == ["1", "2\n3", "4", "\n", "a", "n", "s", ""]
    steps = segment_steps(text, "\n", PIECES.token_offsets(ids))
    assert [s.text for s in steps] == ["12", "34", "ans"]
    assert [(s.start, s.end) for s in steps] == [(0, 2), (3, 5), (6, 9)]
    # "2\n3" ends in step 1: it belongs there; EOS (zero-width at the end) belongs to the last step
    assert [(s.token_start, s.token_end) for s in steps] == [(0, 1), (1, 4), (4, 8)]
    # cutting before step 1 keeps "1"; "2\n" of step 0 is pending for the guide
    assert [s.token_char_start for s in steps] == [0, 1, 6]


def test_step_split_matches_countdown(tok):
    for text in [GOOD, GOOD + "\n\n\n", "\n7 * 3 = 21\n\nanswer: 30", "", " \n"]:
        assert [text[s:e] for s, e in split_steps(text, "\n")] == countdown.split_steps(text)
    assert split_steps("a\n\n\nb\n\n \n\n", "\n\n") == [(0, 1), (3, 5)]  # "a", "\nb"
    ids = tok.encode(GOOD) + [tok.eos_id]
    steps = segment_steps(GOOD, "\n", tok.token_offsets(ids))
    assert [s.text for s in steps] == GOOD.split("\n")
    assert steps[0].token_start == 0 and steps[-1].token_end == len(ids)
    assert all(a.token_end == b.token_start for a, b in zip(steps, steps[1:]))
    # "\n" is its own token: each step's tokens decode to the step and its delimiter
    assert [tok.decode(ids[s.token_start : s.token_end]) for s in steps] == [
        "7 * 3 = 21\n",
        "21 + 9 = 30\n",
        "answer: 30",
    ]
    assert [s.token_char_start for s in steps] == [s.start for s in steps]
    with pytest.raises(ValueError, match="offsets"):
        segment_steps(GOOD + "x", "\n", tok.token_offsets(ids))


def test_oracle_prm_and_first_error():
    prm = CountdownOraclePRM()
    q = P30.prompt()
    assert prm.score_steps(q, GOOD.split("\n")) == [1.0, 1.0, 1.0]
    scores = prm.score_batch([q, q, q], [WRONG_STEP1.split("\n"), WRONG_STEP0.split("\n"), [NO_ERROR]])
    assert scores == [[1.0, 0.0, 0.0], [0.0, 0.0], [1.0]]
    assert [first_error_step(s, 0.5) for s in scores] == [1, 0, None]
    assert first_error_step([0.9, 0.6, 0.4], 0.7) == 1
    with pytest.raises(ValueError, match="delimiter"):
        prm.score_steps(q, ["7 * 3 = 21\n21 + 9 = 30"])


# ----------------------------------------------------------------------------- rectification


def test_oracle_guide_salvages_with_token_exact_prefix(tok):
    texts = [GOOD, WRONG_STEP1, WRONG_STEP0, NO_ERROR]
    group, out, stats = run(tok, P30, texts, ScopeConfig(step_delimiter="\n", max_rectified_per_group=4))
    assert len(out) == 4 and out[0] is group[0]
    s = out[1]
    assert s.salvaged and s.correct and s.reward == 1.0 and s.answer == "30"
    assert countdown.is_correct(P30, s.response_text)
    assert s.response_text.startswith("7 * 3 = 21\n") and s.prefix_steps == 1 and s.first_error_step == 1
    cut = len(tok.encode("7 * 3 = 21\n"))
    orig = group[1]
    assert s.response_ids[:cut] == orig.response_ids[:cut]
    assert s.rollout_logprobs[:cut] == orig.rollout_logprobs[:cut]
    assert all(math.isnan(x) for x in s.rollout_logprobs[cut:])
    assert s.off_policy == [False] * cut + [True] * (len(s.response_ids) - cut)
    assert s.on_policy == [not x for x in s.off_policy]
    assert s.response_ids[cut:] == tok.encode(s.response_text[len("7 * 3 = 21\n") :]) + [tok.eos_id]
    assert tok.decode(s.response_ids) == s.response_text
    assert s.guide_logprobs is None  # a text guide has no logprobs
    assert s.prompt_ids == orig.prompt_ids and s.group_id == orig.group_id
    # error at step 0 and no error are never salvaged; their PRM verdict is recorded
    assert (
        not out[2].salvaged and out[2].first_error_step == 0 and out[2].response_ids == group[2].response_ids
    )
    assert not out[3].salvaged and out[3].first_error_step is None
    assert (stats.failed, stats.no_error, stats.first_errors) == (3, 1, [1, 0])
    assert (stats.candidates, stats.selected, stats.salvaged) == (1, 1, 1)
    assert stats.prefix_fractions == [cut / len(s.response_ids)]
    assert not group[1].salvaged and group[1].first_error_step is None  # inputs untouched


def test_no_error_or_error_at_step_0_never_salvaged(tok):
    _, out, stats = run(
        tok,
        P30,
        [WRONG_STEP0, NO_ERROR, WRONG_STEP0],
        ScopeConfig(step_delimiter="\n", max_rectified_per_group=8),
    )
    assert not any(t.salvaged for t in out)
    assert (stats.candidates, stats.selected, stats.salvaged) == (0, 0, 0)


def test_replace_keeps_group_size_append_grows_it(tok):
    texts = [WRONG_STEP1, GOOD, WRONG_STEP1]
    _, out, _ = run(tok, P30, texts, ScopeConfig(step_delimiter="\n", max_rectified_per_group=2))
    assert len(out) == 3 and [t.salvaged for t in out] == [True, False, True]
    group, out, stats = run(
        tok, P30, texts, ScopeConfig(step_delimiter="\n", max_rectified_per_group=2, mode="append")
    )
    assert len(out) == 5 and [t.salvaged for t in out] == [False, False, False, True, True]
    assert [t.response_ids for t in out[:3]] == [t.response_ids for t in group] and stats.salvaged == 2


def test_candidates_prefer_the_longest_prefix(tok):
    assert select_candidates([1, None, 2, 0, 2, 3], [False, False, False, False, False, True], 1, 2) == [2, 4]
    assert select_candidates([1, 2, 1], [False] * 3, 2, 5) == [1]
    assert select_candidates([0, None], [False, False], 1, 5) == []
    _, out, stats = run(tok, P25, [K1, K2, K1_OTHER, K2], TOY)
    assert [t.salvaged for t in out] == [False, True, False, False]
    assert out[1].prefix_steps == 2 and out[1].response_text.startswith("3 + 2 = 5\n5 * 4 = 20\n")
    assert countdown.is_correct(P25, out[1].response_text)
    assert stats.first_errors == [1, 2, 1, 2] and stats.candidates == 4 and stats.selected == 1


def test_oracle_guide_on_many_failed_rollouts(tok):
    """Random problems, failed rollouts made by hand: a correct first step then a wrong second step."""
    rng = random.Random(3)
    salvaged = 0
    for problem in countdown.make_problems(30, 7):
        first = countdown.random_solution(problem, rng).split("\n")[0]
        a = countdown.parse_step(first).result
        bad = f"{first}\n{a} + {a} = {2 * a + 1}\nanswer: {2 * a + 1}"  # wrong arithmetic
        _, out, _ = run(tok, problem, [bad, bad], ScopeConfig(step_delimiter="\n", guide="oracle"))
        s = out[0]
        assert s.salvaged and countdown.is_correct(problem, s.response_text) and not out[1].salvaged
        cut = s.off_policy.index(True)
        assert s.response_ids[:cut] == tok.encode(first + "\n") and s.prefix_steps == 1
        salvaged += 1
    assert salvaged == 30


def test_luffy_replaces_whole_response_off_policy(tok):
    texts = [WRONG_STEP0, GOOD, WRONG_STEP1]
    group, out, stats = run(tok, P30, texts, ScopeConfig(step_delimiter="\n", method="luffy"))
    assert [t.salvaged for t in out] == [True, False, False]
    s = out[0]
    assert s.off_policy == [True] * len(s.response_ids) and s.prefix_steps == 0
    assert countdown.is_correct(P30, s.response_text) and s.first_error_step is None
    assert (stats.candidates, stats.selected, stats.salvaged, stats.first_errors) == (2, 1, 1, [])


def test_other_methods_leave_groups_unchanged(tok):
    for cfg in (ScopeConfig(enabled=False), ScopeConfig(method="none"), ScopeConfig(method="prm_dense")):
        group, out, stats = run(tok, P30, [WRONG_STEP1, GOOD], cfg)
        assert out == group and stats.failed == 1 and stats.selected == 0


def test_reference_guide_and_require_correct(tok):
    same_path = PromptInfo(P30.prompt(), P30.prompt(), reference_solution=GOOD + "\n")
    _, out, _ = run(tok, P30, [WRONG_STEP1], guide=ReferenceGuide("\n"), prompt=same_path)
    assert out[0].salvaged and out[0].response_text == GOOD
    # the reference took another path: splicing its step 1 after our step 0 is wrong
    other = PromptInfo(P30.prompt(), P30.prompt(), reference_solution="9 * 3 = 27\n27 + 3 = 30\nanswer: 30")
    _, out, stats = run(tok, P30, [WRONG_STEP1], guide=ReferenceGuide("\n"), prompt=other)
    assert not out[0].salvaged and stats.rejected == 1
    kept = ScopeConfig(step_delimiter="\n", require_correct=False)
    _, out, stats = run(tok, P30, [WRONG_STEP1], kept, guide=ReferenceGuide("\n"), prompt=other)
    assert out[0].salvaged and not out[0].correct and out[0].reward == 0.0 and stats.salvaged == 1
    short = PromptInfo(P30.prompt(), P30.prompt(), reference_solution="answer: 30")
    _, out, stats = run(tok, P30, [WRONG_STEP1], guide=ReferenceGuide("\n"), prompt=short)
    assert not out[0].salvaged and stats.guide_none == 1


class FixedPRM(PRM):
    def __init__(self, scores):
        self.scores = scores

    def score_batch(self, questions, steps):
        return [self.scores[: len(s)] for s in steps]


class ExactVerifier(Verifier):
    def verify(self, response_text, reference):
        ok = response_text == reference
        return make_result(ok, None, "ok" if ok else "mismatch", RewardConfig())


class FakeEngine:
    def __init__(self, continuation):
        self.continuation = continuation
        self.seen = []

    def continue_prefixes(self, token_prefixes):
        self.seen.extend(list(p) for p in token_prefixes)
        return [self.continuation for _ in token_prefixes]


def test_engine_guide_with_a_token_across_the_cut():
    class Completion:
        token_ids = PIECES.encode("2\n9\nans") + [PIECES.eos_id]
        logprobs = [-0.5, -0.25, -0.125, -1.0, -2.0, -3.0, -4.0, -0.75]
        text = "2\n9\nans"

    text = "12\n34\nans"
    ids = PIECES.encode(text) + [PIECES.eos_id]
    rollout_ = Trajectory([7, 8], ids, [-0.1 * (i + 1) for i in range(len(ids))], text, 0.0, False, 0)
    engine = FakeEngine(Completion())
    groups, stats = rectify_groups(
        [[rollout_]],
        [PromptInfo("q", "12\n9\nans")],
        ScopeConfig(step_delimiter="\n"),
        tokenizer=PIECES,
        verifier=ExactVerifier(),
        guide=EngineGuide(engine),
        prm=FixedPRM([1.0, 0.2, 0.1]),
    )
    s = groups[0][0]
    assert engine.seen == [[7, 8, ids[0]]]  # prompt + the one whole token of step 0
    assert s.salvaged and s.correct and s.response_text == "12\n9\nans"
    assert s.response_ids == [ids[0], *Completion.token_ids]
    assert s.off_policy == [False] + [True] * 8
    assert s.rollout_logprobs[0] == rollout_.rollout_logprobs[0] and all(
        math.isnan(x) for x in s.rollout_logprobs[1:]
    )
    assert math.isnan(s.guide_logprobs[0]) and s.guide_logprobs[1:] == Completion.logprobs
    assert stats.prefix_fractions == [1 / 9]


def test_text_guide_re_emits_pending_characters():
    text = "12\n34\nans"
    ids = PIECES.encode(text) + [PIECES.eos_id]
    rollout_ = Trajectory([7], ids, [-0.1] * len(ids), text, 0.0, False, 0)
    groups, _ = rectify_groups(
        [[rollout_]],
        [PromptInfo("q", "12\n56\nans", reference_solution="12\n56\nans")],
        ScopeConfig(step_delimiter="\n", guide="reference"),
        tokenizer=PIECES,
        verifier=ExactVerifier(),
        guide=ReferenceGuide("\n"),
        prm=FixedPRM([1.0, 0.0, 0.0]),
    )
    s = groups[0][0]
    assert s.response_text == "12\n56\nans" and s.correct
    assert s.response_ids[:1] == ids[:1]  # "2\n" of step 0 came back as guide tokens
    assert s.response_ids[1:] == PIECES.encode("2\n56\nans") + [PIECES.eos_id]
    assert s.off_policy == [False] + [True] * (len(s.response_ids) - 1)


def test_config_validation():
    assert ScopeConfig().step_delimiter == "\n\n" and ScopeConfig().active_method == "scope"
    assert ScopeConfig(enabled=False, method="luffy").active_method == "none"
    for bad in (
        {"method": "x"},
        {"guide": "x"},
        {"mode": "x"},
        {"min_prefix_steps": 0},
        {"prm_threshold": 0.0},
        {"max_rectified_per_group": 0},
        {"step_delimiter": ""},
    ):
        with pytest.raises(ValueError):
            ScopeConfig(**bad)
    with pytest.raises(ValueError, match="entries"):
        Trajectory([1], [2, 3], [0.0], "x", 0.0, False, 0)
