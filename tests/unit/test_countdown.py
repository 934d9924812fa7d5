"""Countdown task: formats, oracle step labels, solver/guide, generator and splits."""

import itertools
import random
from collections import Counter

import pytest

from scope_mega.data.countdown import (
    STEP_DELIMITER,
    Problem,
    State,
    Step,
    TaskConfig,
    apply_step,
    can_reach,
    continue_solution,
    is_correct,
    is_held_out,
    make_problems,
    parse_answer,
    parse_prompt,
    parse_step,
    random_solution,
    sample_problem,
    solution_path_signature,
    split_steps,
    step_correctness,
)

P30 = Problem((3, 7, 9), 30)  # solutions: 7 * 3 = 21, 21 + 9 = 30 (and operand-swapped variants)
P10 = Problem((2, 3, 4), 10)  # exactly two paths: 3 * 2 then + 4; 4 * 3 then - 2


def _compute(a, op, b):
    """Reference arithmetic written independently of the module."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a - b > 0 else None
    return a // b if b and a % b == 0 else None


def _reachable_values(nums, ops):
    """Brute force: every value available in any state reachable from `nums` (no memo, ordered pairs)."""
    out = set(nums)
    for i, j in itertools.permutations(range(len(nums)), 2):
        for op in ops:
            c = _compute(nums[i], op, nums[j])
            if c is not None:
                rest = [x for k, x in enumerate(nums) if k not in (i, j)]
                out |= _reachable_values(rest + [c], ops)
    return out


def _all_paths(nums, target, ops):
    """Brute force: all canonical paths (larger operand first) that stop when the target appears."""
    if target in nums:
        return {()}
    paths = set()
    for i, j in itertools.permutations(range(len(nums)), 2):
        a, b = nums[i], nums[j]
        if a < b:
            continue
        for op in ops:
            c = _compute(a, op, b)
            if c is not None:
                rest = [x for k, x in enumerate(nums) if k not in (i, j)]
                for tail in _all_paths(rest + [c], target, ops):
                    paths.add((f"{a} {op} {b} = {c}",) + tail)
    return paths


def test_formats_and_hand_written_solutions():
    assert STEP_DELIMITER == "\n"
    assert P30.prompt() == "numbers: 3 7 9\ntarget: 30\n"
    assert parse_prompt(P30.prompt()) == P30
    assert parse_prompt("numbers: 3 7 9\ntarget: x\n") is None
    good = "7 * 3 = 21\n21 + 9 = 30\nanswer: 30"
    swapped = "3 * 7 = 21\n9 + 21 = 30\nanswer: 30\n\n"  # commutative order, trailing blank lines
    for text in (good, swapped, "7*3=21\n21+9=30\nanswer:30"):
        assert step_correctness(P30, text) == [True, True, True]
        assert is_correct(P30, text)
    assert solution_path_signature(P30, good) == solution_path_signature(P30, swapped)
    assert solution_path_signature(P30, good) == ("21 + 9 = 30", "7 * 3 = 21")
    assert parse_step("12 - 9 = 3") == Step(12, "-", 9, 3)
    assert parse_step("answer: 3") is None and parse_answer("answer: 3") == 3
    assert parse_step("3 - 7 = -4") is None and parse_step("07 + 1 = 8") is None
    assert split_steps("a\n\nb\n \n\n") == ["a", "", "b"]


def test_state_and_apply_step():
    s = State.of((3, 3, 4))
    assert apply_step(s, Step(3, "+", 3, 6)) == State((4, 6))
    assert apply_step(State.of((3, 4)), Step(3, "+", 3, 6)) is None  # only one 3 available
    assert apply_step(s, Step(4, "*", 3, 13)) is None  # wrong arithmetic
    assert apply_step(s, Step(3, "-", 3, 0)) is None  # non-positive results are not allowed
    assert apply_step(State.of((2, 8)), Step(8, "/", 2, 4)) is None  # "/" not in default ops
    assert apply_step(State.of((2, 8)), Step(8, "/", 2, 4), ops=("+", "/")) == State((4,))
    assert apply_step(State.of((2, 9)), Step(9, "/", 2, 4), ops=("/",)) is None  # inexact
    assert 6 in apply_step(s, Step(3, "+", 3, 6))


def test_wrong_arithmetic_flags_step_and_all_later():
    assert step_correctness(P30, "7 * 3 = 22\n21 + 9 = 30\nanswer: 30") == [False, False, False]
    assert step_correctness(P30, "7 * 3 = 21\n21 + 9 = 31\nanswer: 30") == [True, False, False]
    assert step_correctness(P30, "7 * 3 = 21\n7 + 9 = 16\nanswer: 30") == [True, False, False]  # 7 used
    assert not is_correct(P30, "7 * 3 = 21\n21 + 9 = 31\nanswer: 30")


def test_correct_arithmetic_that_loses_the_target_is_flagged():
    assert apply_step(State.of(P30.numbers), Step(9, "-", 7, 2)) == State((2, 3))
    assert not can_reach((2, 3), 30)
    assert step_correctness(P30, "9 - 7 = 2\n3 * 2 = 6\nanswer: 6") == [False, False, False]
    assert step_correctness(P10, "3 + 2 = 5\n5 * 4 = 20") == [False, False]  # 10 unreachable from {4, 5}
    assert step_correctness(P10, "3 * 2 = 6\n6 + 4 = 10\nanswer: 10") == [True, True, True]


def test_answer_line_rules():
    assert step_correctness(P30, "answer: 30") == [False]  # target not available yet
    assert step_correctness(P30, "7 * 3 = 21\n21 + 9 = 30\nanswer: 31") == [True, True, False]
    after = "7 * 3 = 21\n21 + 9 = 30\nanswer: 30\nanswer: 30"
    assert step_correctness(P30, after) == [True, True, True, False]
    assert not is_correct(P30, after)
    assert step_correctness(P30, "7 * 3 = 21\n\n21 + 9 = 30\nanswer: 30") == [True, False, False, False]
    assert not is_correct(P30, "7 * 3 = 21\n21 + 9 = 30")  # truncated: no answer line
    # a hand-made problem whose target is given may be answered directly
    assert is_correct(Problem((5, 6), 5), "answer: 5")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "answer:",
        "answer: 30",
        "7 * 3 = 2",
        "x" * 1000,
        "9" * 5000 + " + 1 = 2\nanswer: 30",
        "\u0667 * \u0663 = 21\n21 + 9 = 30\nanswer: 30",  # non-ASCII digits
        "7 * 3 = 21\r\n21 + 9 = 30\r\nanswer: 30",
        "answer: 30\n7 * 3 = 21\n21 + 9 = 30",
        "\x00\uffff=+-*/ answer: answer:30 30",
    ],
)
def test_garbage_is_incorrect_without_exceptions(text):
    assert is_correct(P30, text) is False
    assert len(step_correctness(P30, text)) == len(split_steps(text))
    assert solution_path_signature(P30, text) is None
    continue_solution(P30, text, random.Random(0))  # must not raise


def test_random_solutions_are_correct_and_uniform_over_paths():
    cfgs = [TaskConfig(), TaskConfig(max_numbers=5, max_value=12, max_target=100, ops=("+", "-", "*", "/"))]
    for cfg in cfgs:
        rng = random.Random(1)
        for problem in make_problems(100, seed=3, cfg=cfg):
            text = random_solution(problem, rng)
            assert is_correct(problem, text), (problem, text)
            assert step_correctness(problem, text) == [True] * len(split_steps(text))
            assert text.endswith(f"answer: {problem.target}") and not text.endswith("\n")
    rng = random.Random(0)
    texts = Counter(random_solution(P10, rng) for _ in range(400))
    assert set(texts) == {"3 * 2 = 6\n6 + 4 = 10\nanswer: 10", "4 * 3 = 12\n12 - 2 = 10\nanswer: 10"}
    assert min(texts.values()) > 150
    # uniform over whole paths (not per step): compare with brute-force enumeration
    problem = Problem((2, 3, 5, 7), 12)
    paths = _all_paths(list(problem.numbers), problem.target, problem.ops)
    draws = Counter(tuple(random_solution(problem, rng).split("\n")[:-1]) for _ in range(40 * len(paths)))
    assert set(draws) == paths
    assert all(15 <= c <= 70 for c in draws.values()), sorted(draws.values())


def test_continue_solution_from_every_prefix():
    rng = random.Random(2)
    cfg = TaskConfig(max_numbers=4, max_value=10, max_target=60)
    for problem in make_problems(60, seed=5, cfg=cfg):
        lines = split_steps(random_solution(problem, rng))
        for k in range(len(lines) + 1):
            prefix = "".join(line + "\n" for line in lines[:k])  # canonical: each line ends with "\n"
            cont = continue_solution(problem, prefix, rng)
            if k == len(lines):
                assert cont == ""
                continue
            assert not cont.startswith("\n") and not cont.endswith("\n")
            assert is_correct(problem, prefix + cont), (problem, prefix, cont)
            if k:  # prefix without the final delimiter: continuation starts with it
                bare = "\n".join(lines[:k])
                cont = continue_solution(problem, bare, rng)
                assert cont.startswith("\n") and is_correct(problem, bare + cont)


def test_continue_solution_rejects_invalid_prefixes():
    rng = random.Random(0)
    assert continue_solution(P30, "7 * 3 = 22\n", rng) is None  # wrong arithmetic
    assert continue_solution(P30, "9 - 7 = 2\n", rng) is None  # target unreachable
    assert continue_solution(P30, "7 * 3 = 21\n\n", rng) is None  # blank line would become a step
    assert continue_solution(Problem((2, 3), 100), "", rng) is None  # unsolvable
    assert continue_solution(P30, "", rng) == "7 * 3 = 21\n21 + 9 = 30\nanswer: 30"
    assert continue_solution(P30, "3 * 7 = 21\n", rng) == "21 + 9 = 30\nanswer: 30"
    with pytest.raises(ValueError):
        random_solution(Problem((2, 3), 100), rng)


def test_can_reach_matches_brute_force():
    cases = [
        c
        for n, hi in ((1, 9), (2, 9), (3, 7), (4, 5))
        for c in itertools.combinations_with_replacement(range(1, hi + 1), n)
    ]
    for ops in (("+", "-", "*"), ("+", "-", "*", "/"), ("-",)):
        for nums in cases:
            values = _reachable_values(list(nums), ops)
            for target in range(1, 80):
                assert can_reach(nums, target, ops) == (target in values), (nums, target, ops)


def test_signature_ignores_order_of_independent_steps():
    problem = Problem((2, 3, 4, 5), 15)
    a = "5 + 4 = 9\n3 * 2 = 6\n9 + 6 = 15\nanswer: 15"
    b = "2 * 3 = 6\n4 + 5 = 9\n6 + 9 = 15\nanswer: 15"
    c = "5 * 3 = 15\nanswer: 15"
    assert is_correct(problem, a) and is_correct(problem, b) and is_correct(problem, c)
    assert solution_path_signature(problem, a) == solution_path_signature(problem, b)
    assert solution_path_signature(problem, a) != solution_path_signature(problem, c)
    assert solution_path_signature(problem, "5 * 3 = 15\nanswer: 16") is None


def test_generator_respects_config_and_is_deterministic():
    cfg = TaskConfig(min_numbers=3, max_numbers=4, max_value=8, max_target=40)
    problems = make_problems(300, seed=7, cfg=cfg)
    assert problems == make_problems(300, seed=7, cfg=cfg)
    assert problems != make_problems(300, seed=8, cfg=cfg)
    for p in problems:
        assert 3 <= len(p.numbers) <= 4 and all(1 <= x <= 8 for x in p.numbers)
        assert 1 <= p.target <= 40 and p.target not in p.numbers and can_reach(p.numbers, p.target)
    assert {len(p.numbers) for p in problems} == {3, 4}
    defaults = make_problems(200, seed=0)
    assert all(len(p.numbers) == 3 and max(p.numbers) <= 9 and p.target <= 50 for p in defaults)
    assert sample_problem(random.Random(4), cfg) == sample_problem(random.Random(4), cfg)


def test_train_and_held_out_are_disjoint_and_stable():
    cfg = TaskConfig()
    train = make_problems(2000, seed=1, cfg=cfg, split="train")
    held = make_problems(100, seed=2, cfg=cfg, split="held_out", unique=True)
    assert not {p.key() for p in train} & {p.key() for p in held}
    assert all(is_held_out(p, cfg.held_out_fraction) for p in held)
    assert len({p.key() for p in held}) == 100
    # the split ignores the order of the numbers (no leakage through permutations)
    assert is_held_out(held[0], 0.1) == is_held_out(Problem(held[0].numbers[::-1], held[0].target), 0.1)
    mixed = make_problems(2000, seed=3, cfg=cfg)
    assert 0.05 < sum(is_held_out(p, 0.1) for p in mixed) / 2000 < 0.15
    with pytest.raises(ValueError):
        make_problems(50, seed=0, cfg=TaskConfig(min_numbers=2, max_numbers=2, max_value=2), unique=True)
    with pytest.raises(ValueError):
        make_problems(1, seed=0, split="test")


def test_validation():
    assert Problem([3, 7, 9], 30, ops=["+", "-", "*"]) == P30  # JSON lists are normalised
    with pytest.raises(ValueError):
        Problem((0, 3), 3)
    with pytest.raises(ValueError):
        Problem((1, 3), 3, ops=("^",))
    with pytest.raises(ValueError):
        TaskConfig(min_numbers=1)
    with pytest.raises(ValueError):
        TaskConfig(min_numbers=4, max_numbers=3)
