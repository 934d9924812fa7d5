"""Math verifier: answer extraction, math-verify equivalence, the hard timeout, agreement on real output."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scope_mega.rewards import MathVerifier, MathVerifierConfig, RewardConfig, extract_answer
from scope_mega.rewards.math_verifier import reference_answer

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(MathVerifierConfig(timeout_s=TIMEOUT_S)) as v:
        assert v.verify(r"\boxed{1}", "1").correct  # warm: worker started and ready
        yield v


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"first \boxed{1}, then \boxed{2} and finally \boxed{x^{2}}", "x^{2}"),
        (r"The answer is \boxed 5.", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed {12}", "12"),
        ("Final Answer: The final answer is 5. I hope it is correct.", "5"),
        ("The answer is $\\frac{1}{2}$ cup.", r"\frac{1}{2}"),
        ("**Final Answer**\n\n\\[ x = 3 \\]", "x = 3"),
        ("so the answer: 42", "42"),
        ("No conclusion here, 3.5 maybe.", None),
        ("To answer this we compute 7.", None),
        (r"\boxed{}", None),
        (r"truncated \boxed{\frac{1}{2}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_reference_answer_normalisation():
    assert reference_answer("$\\frac{1}{2}$") == r"\frac{1}{2}"
    assert reference_answer(r"so \boxed{4} is it") == "4"
    assert reference_answer(" 27.0 ") == "27.0"


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
        (r"[2, \infty)", r"[2,\infty)"),
        (r"(-\infty, 1) \cup (2, \infty)", r"(-\infty,1)\cup(2,\infty)"),
        (r"\{3, 2, 1\}", r"\{1,2,3\}"),
        ("(x+1)^2", "x^2+2x+1"),
        ("10000", "10{,}000"),
        (r"1\frac{9}{10}", r"\frac{19}{10}"),
        (r"\text{(A)}", "A"),
        (r"90^\circ", "90"),
    ],
)
def test_equivalent(verifier, answer, reference):
    result = verifier.verify(f"Thus \\boxed{{{answer}}}.", reference)
    assert (result.correct, result.reward, result.reason, result.extracted) == (True, 1.0, "ok", answer)


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        (r"\frac{1}{3}", "0.33"),
        ("-2", "2"),
        ("(1, 3)", "[1, 3]"),
        (r"\{1, 2\}", r"\{1, 2, 3\}"),
        (r"\sqrt{3}/2", r"\frac{\sqrt2}{2}"),
        ("x^2+1", "(x+1)^2"),
    ],
)
def test_not_equivalent(verifier, answer, reference):
    result = verifier.verify(f"\\boxed{{{answer}}}", reference)
    assert (result.correct, result.reward, result.reason) == (False, 0.0, "mismatch")


def test_no_answer_format_penalty():
    config = MathVerifierConfig(reward=RewardConfig(correct=1.0, incorrect=0.0, format_penalty=0.5))
    with MathVerifier(config) as v:
        result = v.verify("I could not solve it.", "3")
        assert v._worker is None  # decided without the worker
    assert (result.correct, result.reward, result.reason, result.extracted) == (
        False,
        -0.5,
        "no_answer",
        None,
    )


def test_too_long_is_rejected_up_front(verifier):
    start = time.perf_counter()
    long_answer = verifier.verify("\\boxed{" + "1+" * 50_000 + "1}", "3")
    long_response = verifier.verify("x" * 1_000_001 + r"\boxed{3}", "3")
    assert time.perf_counter() - start < 1.0
    assert (long_answer.correct, long_answer.reason) == (False, "too_long")
    assert (long_response.correct, long_response.reason) == (False, "too_long")


@pytest.mark.parametrize("answer", [r"10^{10^{10^{10}}}", r"(10^{10})!"])
def test_pathological_answer_times_out_and_verifier_recovers(verifier, answer):
    start = time.perf_counter()
    result = verifier.verify(f"\\boxed{{{answer}}}", "5")
    elapsed = time.perf_counter() - start
    assert (result.correct, result.reason) == (False, "timeout")
    assert elapsed < TIMEOUT_S + 3
    assert verifier.verify(r"\boxed{5}", "5").correct


def test_batch_with_pathological_item(verifier):
    tower = r"\boxed{9^{9^{9^{9}}}}"
    responses = [r"\boxed{1}", tower, r"\boxed{\frac{6}{4}}", tower, "no idea", r"\boxed{4}"]
    start = time.perf_counter()
    results = verifier.verify_batch(responses, ["1", "5", "1.5", "5", "2", "5"])
    elapsed = time.perf_counter() - start
    assert [(r.correct, r.reason) for r in results] == [
        (True, "ok"),
        (False, "timeout"),
        (True, "ok"),
        (False, "timeout"),
        (False, "no_answer"),
        (False, "mismatch"),
    ]
    assert elapsed < TIMEOUT_S + 3  # the duplicate pathological pair ran once


def test_recovers_from_killed_worker(verifier):
    verifier._worker.process.kill()
    verifier._worker.process.wait()
    assert verifier.verify(r"\boxed{2}", "2").correct


def test_usable_from_a_thread(verifier):
    results = []
    thread = threading.Thread(target=lambda: results.append(verifier.verify(r"\boxed{0.5}", r"\frac12")))
    thread.start()
    thread.join(30)
    assert results and results[0].correct


def test_batch_length_mismatch(verifier):
    with pytest.raises(ValueError):
        verifier.verify_batch(["a"], [])


def test_worker_is_reaped_at_interpreter_exit():
    """A script that never calls close() exits promptly and leaves no worker behind."""
    script = (
        "from scope_mega.rewards import MathVerifier\n"
        "v = MathVerifier()\n"
        "assert v.verify(r'\\boxed{1}', '1').correct\n"
        "print(v._worker.process.pid)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.strip())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_agreement_with_reference_grader(data_dir, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "verifier_agreement", REPO_ROOT / "tools/verifier_agreement.py"
    )
    tool = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tool)  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    report = tool.run(data_dir / "verifier" / "math_cot_100.jsonl", MathVerifierConfig())
    assert report.total == 800
    assert report.rate >= 0.98, [tool.category(d) for d in report.disagreements]
