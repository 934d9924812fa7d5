"""Countdown: the built-in toy reasoning task, with a programmatic step checker and solver.

Given a few small numbers and a target, combine two available numbers per step until the target is
available. It has many valid solution paths (diversity metrics), a cheap exact oracle PRM
(`step_correctness`) and an exact guide (`continue_solution`), so SCOPE can be tested end to end on a
laptop CPU without any learned PRM or teacher.

Text formats (one step per line, `STEP_DELIMITER = "\\n"`):

    prompt:    "numbers: 3 7 9\\ntarget: 30\\n"
    response:  "7 * 3 = 21\\n21 + 9 = 30\\nanswer: 30"

A step line is `a op b = c` with op one of the problem's ops. Rules (fixed here, one home for them):
- both operands must be currently available (a multiset: `3 + 3` needs two 3s); they are consumed and
  the result becomes available;
- every value is a positive integer: `a - b` needs a > b, `a / b` must be exact (division is off by
  default); `+` and `*` accept either operand order;
- a solution need not use every number; the final line `answer: T` is itself a step and is correct iff
  T is the target and the target is available at that point. Generated problems never have the target
  among the given numbers, so a correct answer always follows at least one step.
- nothing may follow the answer line.

Solutions written by this module (`random_solution`, `continue_solution`) put the larger operand first
and stop at the first step that makes the target available.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from scope_mega.ranges import Checked, between, ge

STEP_DELIMITER = "\n"
ANSWER_PREFIX = "answer:"
ALL_OPS = ("+", "-", "*", "/")
DEFAULT_OPS = ("+", "-", "*")
SPLITS = ("all", "train", "held_out")

# At most 18 digits: bounded work for garbage input (int() refuses > 4300 digits) and no leading zeros.
_DIGITS = r"[1-9][0-9]{0,17}"
_NUM = f"({_DIGITS})"
_STEP_RE = re.compile(rf"[ \t]*{_NUM}[ \t]*([-+*/])[ \t]*{_NUM}[ \t]*=[ \t]*{_NUM}[ \t]*")
_ANSWER_RE = re.compile(rf"[ \t]*{ANSWER_PREFIX}[ \t]*{_NUM}[ \t]*")
_PROMPT_RE = re.compile(rf"numbers:((?: {_DIGITS})+)\ntarget: {_NUM}\n?")


@dataclass(frozen=True)
class Problem:
    """A Countdown instance. `ops` is a task-level setting: the prompt does not repeat it."""

    numbers: tuple[int, ...]
    target: int
    ops: tuple[str, ...] = DEFAULT_OPS

    def __post_init__(self) -> None:
        object.__setattr__(self, "numbers", tuple(self.numbers))  # lists (e.g. from JSON) stay hashable
        object.__setattr__(self, "ops", tuple(self.ops))
        if len(self.numbers) < 1 or any(n < 1 for n in self.numbers) or self.target < 1:
            raise ValueError(f"numbers and target must be positive integers: {self}")
        if not self.ops or any(op not in ALL_OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {ALL_OPS}, got {self.ops}")

    def prompt(self) -> str:
        """`numbers: 3 7 9\\ntarget: 30\\n` (numbers in the problem's order)."""
        return f"numbers: {' '.join(map(str, self.numbers))}\ntarget: {self.target}\n"

    def key(self) -> str:
        """Order-independent identity: permutations of the numbers are the same problem."""
        return f"{','.join(map(str, sorted(self.numbers)))}|{self.target}|{''.join(self.ops)}"


def parse_prompt(text: str, ops: tuple[str, ...] = DEFAULT_OPS) -> Problem | None:
    """Inverse of `Problem.prompt` (None if `text` is not a Countdown prompt)."""
    m = _PROMPT_RE.fullmatch(text)
    if m is None:
        return None
    return Problem(tuple(int(x) for x in m.group(1).split()), int(m.group(2)), ops)


@dataclass
class TaskConfig(Checked):
    """Difficulty knobs for generated problems.

    Defaults are deliberately easier than the calibration point in docs/design.md section 5 (3-4 numbers
    from 1-12: a 4-minute character model reached only 8% greedy): exactly 3 numbers from 1-9 keep
    every given number one digit/token and every solution at most two steps plus the answer, and the
    generating solution keeps every value <= `max_target` (at most two digits), so a tiny model should
    become partially competent in minutes with room left for RL (not yet measured with a model).
    At the defaults there are ~1,360 distinct problems up to the order of the numbers (~125 held
    out) with a median of 3 distinct solution paths; `max_numbers=4` gives ~11,800 problems with a
    median of 11 paths (harder, more room for diversity). `held_out_fraction` of all problems (by a
    stable hash of `Problem.key`) form the held-out split.
    """

    min_numbers: int = field(default=3, metadata=between(2, 6))
    max_numbers: int = field(default=3, metadata=between(2, 6))
    max_value: int = field(default=9, metadata=ge(2))
    max_target: int = field(default=50, metadata=ge(2))
    ops: tuple[str, ...] = DEFAULT_OPS
    held_out_fraction: float = field(default=0.1, metadata=between(0, 1, lo_open=True, hi_open=True))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_numbers > self.max_numbers:
            raise ValueError(f"min_numbers={self.min_numbers} must be <= max_numbers={self.max_numbers}")
        if not self.ops or any(op not in ALL_OPS for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {ALL_OPS}, got {self.ops}")


@dataclass(frozen=True)
class Step:
    """One arithmetic step `left op right = result` as written (not necessarily correct)."""

    left: int
    op: str
    right: int
    result: int

    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"


@dataclass(frozen=True)
class State:
    """Multiset of available numbers, kept sorted so equal multisets compare and hash equal."""

    numbers: tuple[int, ...]

    @classmethod
    def of(cls, numbers: Iterable[int]) -> State:
        return cls(tuple(sorted(numbers)))

    def __contains__(self, value: int) -> bool:
        return value in self.numbers


def compute(a: int, op: str, b: int) -> int | None:
    """`a op b` under the task rules (positive integers only), or None if not allowed."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    if op == "/":
        return a // b if a % b == 0 else None
    return None


def parse_step(line: str) -> Step | None:
    """Parse `a op b = c` (spaces optional); None for anything else, including the answer line."""
    m = _STEP_RE.fullmatch(line)
    if m is None:
        return None
    return Step(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)))


def parse_answer(line: str) -> int | None:
    """The value of an `answer: T` line, or None."""
    m = _ANSWER_RE.fullmatch(line)
    return None if m is None else int(m.group(1))


def apply_step(state: State, step: Step, ops: tuple[str, ...] = DEFAULT_OPS) -> State | None:
    """State after `step`, or None if the op is not allowed, the arithmetic is wrong or an operand
    is not available."""
    if step.op not in ops or compute(step.left, step.op, step.right) != step.result:
        return None
    rest = list(state.numbers)
    for operand in (step.left, step.right):
        if operand not in rest:
            return None
        rest.remove(operand)
    bisect.insort(rest, step.result)
    return State(tuple(rest))


def _successors(numbers: tuple[int, ...], ops: tuple[str, ...]) -> list[tuple[Step, tuple[int, ...]]]:
    """Every distinct canonical step (larger operand first) from a sorted multiset, with its result."""
    out = []
    n = len(numbers)
    for i in range(n):
        if i > 0 and numbers[i] == numbers[i - 1]:
            continue
        for j in range(i + 1, n):
            if j > i + 1 and numbers[j] == numbers[j - 1]:
                continue
            b, a = numbers[i], numbers[j]
            rest = numbers[:i] + numbers[i + 1 : j] + numbers[j + 1 :]
            for op in ops:
                c = compute(a, op, b)
                if c is not None:
                    child = list(rest)
                    bisect.insort(child, c)
                    out.append((Step(a, op, b, c), tuple(child)))
    return out


@lru_cache(maxsize=1 << 17)
def _reach(numbers: tuple[int, ...], target: int, ops: tuple[str, ...]) -> bool:
    if target in numbers:
        return True
    return any(_reach(child, target, ops) for _, child in _successors(numbers, ops))


@lru_cache(maxsize=1 << 16)
def _count_paths(numbers: tuple[int, ...], target: int, ops: tuple[str, ...]) -> int:
    """Number of canonical step sequences from `numbers` that end when the target first appears."""
    if target in numbers:
        return 1
    return sum(_count_paths(child, target, ops) for _, child in _successors(numbers, ops))


def can_reach(numbers: Iterable[int], target: int, ops: tuple[str, ...] = DEFAULT_OPS) -> bool:
    """Whether some sequence of steps from this multiset makes `target` available (memoised search)."""
    return _reach(tuple(sorted(numbers)), target, tuple(ops))


def _sample_path(state: State, target: int, ops: tuple[str, ...], rng: random.Random) -> list[Step] | None:
    """A path drawn uniformly from all canonical paths from `state` to the target (None if none)."""
    numbers, path = state.numbers, []
    while target not in numbers:
        options = [
            (step, child, _count_paths(child, target, ops)) for step, child in _successors(numbers, ops)
        ]
        total = sum(count for _, _, count in options)
        if total == 0:
            return None
        r = rng.randrange(total)
        for step, child, count in options:
            if r < count:
                path.append(step)
                numbers = child
                break
            r -= count
    return path


def split_steps(text: str) -> list[str]:
    """Step lines of a response: split on STEP_DELIMITER, trailing blank lines dropped (interior blank
    lines are kept: they are malformed steps)."""
    lines = text.split(STEP_DELIMITER)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _replay(problem: Problem, lines: list[str]) -> tuple[list[bool], State, bool]:
    """Per-line correctness flags, the state after the last correct line, and whether it answered."""
    state, answered, flags, ok = State.of(problem.numbers), False, [], True
    for line in lines:
        if ok:
            value = parse_answer(line)
            if answered:
                ok = False
            elif value is not None:
                ok = answered = value == problem.target and problem.target in state
            else:
                step = parse_step(line)
                new = apply_step(state, step, problem.ops) if step is not None else None
                ok = new is not None and can_reach(new.numbers, problem.target, problem.ops)
                state = new if ok else state
        flags.append(ok)
    return flags, state, answered


def step_correctness(problem: Problem, response_text: str) -> list[bool]:
    """Oracle PRM labels: one flag per step of `split_steps(response_text)`.

    A step is correct iff it parses, uses available numbers, is arithmetically right under the rules
    and the target is still reachable afterwards; the answer line is correct iff it states the target
    and the target is available. Everything after the first wrong step is wrong.
    """
    return _replay(problem, split_steps(response_text))[0]


def is_correct(problem: Problem, response_text: str) -> bool:
    """Exact outcome check: every step correct and the last one is a correct answer line."""
    flags, _, answered = _replay(problem, split_steps(response_text))
    return bool(flags) and all(flags) and answered


def _format(steps: list[Step], target: int) -> str:
    return STEP_DELIMITER.join([s.text() for s in steps] + [f"{ANSWER_PREFIX} {target}"])


def random_solution(problem: Problem, rng: random.Random) -> str:
    """A solution drawn uniformly from all canonical solution paths, ending with the answer line.

    Raises ValueError if the problem is unsolvable.
    """
    path = _sample_path(State.of(problem.numbers), problem.target, problem.ops, rng)
    if path is None:
        raise ValueError(f"unsolvable problem: {problem}")
    return _format(path, problem.target)


def continue_solution(problem: Problem, partial_response_text: str, rng: random.Random) -> str | None:
    """A correct continuation of a correct partial solution (the oracle guide).

    Join convention: the prefix is "" or complete step lines, canonically each ending with "\\n" (as
    when a response is cut at the start of its first wrong step); the returned text never ends with
    "\\n" and `partial + continuation` is always a complete correct solution. A prefix without the
    final "\\n" is accepted too: the continuation then starts with "\\n". Returns "" if the prefix
    already ends with a correct answer line, None if the prefix has a wrong or blank step.
    """
    lines = partial_response_text.split(STEP_DELIMITER)
    if partial_response_text == "" or partial_response_text.endswith(STEP_DELIMITER):
        lines.pop()
    flags, state, answered = _replay(problem, lines)
    if not all(flags):
        return None
    if answered:
        return ""
    path = _sample_path(state, problem.target, problem.ops, rng)
    if path is None:
        return None
    sep = (
        ""
        if partial_response_text == "" or partial_response_text.endswith(STEP_DELIMITER)
        else STEP_DELIMITER
    )
    return sep + _format(path, problem.target)


def solution_path_signature(problem: Problem, response_text: str) -> tuple[str, ...] | None:
    """Canonical key of a correct solution's path: the sorted multiset of its steps with commutative
    operands ordered larger first (so reordering independent steps or swapping `a + b` is the same
    path). None for incorrect responses: they are not solution paths."""
    if not is_correct(problem, response_text):
        return None
    steps = [parse_step(line) for line in split_steps(response_text)[:-1]]
    canon = [
        Step(max(s.left, s.right), s.op, min(s.left, s.right), s.result) if s.op in ("+", "*") else s
        for s in steps
    ]
    return tuple(sorted(s.text() for s in canon))


def sample_problem(rng: random.Random, cfg: TaskConfig | None = None) -> Problem:
    """A solvable problem: random numbers, target = result of a random solution using all of them.

    Every value of that generating solution stays <= cfg.max_target; the target is never one of the
    given numbers (no zero-step problems).
    """
    cfg = cfg or TaskConfig()
    ops = tuple(cfg.ops)
    while True:
        numbers = [
            rng.randint(1, cfg.max_value) for _ in range(rng.randint(cfg.min_numbers, cfg.max_numbers))
        ]
        pool = list(numbers)
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            a, b = max(pool[i], pool[j]), min(pool[i], pool[j])
            results = [c for op in ops if (c := compute(a, op, b)) is not None and c <= cfg.max_target]
            if not results:
                break
            pool = [x for k, x in enumerate(pool) if k not in (i, j)] + [rng.choice(results)]
        if len(pool) == 1 and pool[0] not in numbers:
            return Problem(tuple(numbers), pool[0], ops)


def is_held_out(problem: Problem, fraction: float) -> bool:
    """Stable split by a hash of `Problem.key` (same answer in every process and run)."""
    digest = hashlib.sha256(problem.key().encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def make_problems(
    n: int, seed: int, cfg: TaskConfig | None = None, split: str = "all", unique: bool = False
) -> list[Problem]:
    """`n` problems, deterministic for (`seed`, `cfg`, `split`, `unique`).

    `split`: "all", "train" or "held_out" (disjoint by `is_held_out`, so any train set and any
    held-out set never share a problem, whatever their seeds). `unique`: no two problems with the same
    `Problem.key`; raises ValueError if the split has too few distinct problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = cfg or TaskConfig()
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 10):
            raise ValueError(f"could not draw {n} distinct {split} problems with {cfg}")
        problem = sample_problem(rng, cfg)
        if split != "all" and is_held_out(problem, cfg.held_out_fraction) != (split == "held_out"):
            continue
        if unique:
            if problem.key() in seen:
                continue
            seen.add(problem.key())
        out.append(problem)
    return out
