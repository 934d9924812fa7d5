"""Evaluation: the benchmark loader on the real files, scoring saved responses against the reference
grader's labels, pass@k by hand, and engine-driven evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scope_mega.data.benchmarks import (
    FORMATS,
    EvalDataError,
    Problem,
    detect_format,
    load_benchmark,
    load_responses,
    render_prompt,
)
from scope_mega.eval import evaluate_engine, format_table, score
from scope_mega.rewards.math_verifier import MathVerifier
from scope_mega.rollout.engine import Completion, SamplingParams

DATA = Path(__file__).resolve().parents[2] / "data"  # the repository's data/, as conftest's `data_dir`
BENCH = DATA / "benchmarks"
VERIFIER_FILE = DATA / "verifier" / "math_cot_100.jsonl"

# file -> (rows, first question prefix, first answer, second answer)
EXPECTED = {
    "aime24": (30, "Every morning Aya goes for a $9$-kilometer-long walk", "204", "113"),
    "amc23": (40, "Cities $A$ and $B$ are $45$ miles apart.", "27", "36"),
    "minerva_math": (272, "Each of the two Magellan telescopes has a diameter of $6.5", "1.6", "4.5e33"),
    "olympiadbench": (675, "Xenia and Sergey play the following game.", "2", "\\frac{1}{2 n+2}"),
    "gsm8k": (1319, "Janet\u2019s ducks lay 16 eggs per day.", "18", "3"),
}


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier() as v:
        yield v


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_on_real_benchmarks(name, tmp_path):
    rows, question, first, second = EXPECTED[name]
    problems = load_benchmark(BENCH / f"{name}.jsonl")
    assert len(problems) == rows
    assert problems[0].question.startswith(question)
    assert (problems[0].answer, problems[1].answer) == (first, second)
    assert problems[0].source == name
    raw = json.loads((BENCH / f"{name}.jsonl").open().readline())
    assert problems[0].question == raw[FORMATS[name].question]
    # detection from the fields alone (a file name that says nothing) and the told format agree
    anon = tmp_path / "set.jsonl"
    shutil.copy(BENCH / f"{name}.jsonl", anon)
    assert detect_format(raw) == name
    assert [p.answer for p in load_benchmark(anon, limit=5)] == [p.answer for p in problems[:5]]
    assert [p.answer for p in load_benchmark(anon, format=name, limit=5)] == [p.answer for p in problems[:5]]


def test_loader_errors(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(EvalDataError, match="cannot detect"):
        load_benchmark(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(EvalDataError, match="####"):
        load_benchmark(bad, format="gsm8k")


def test_scoring_mode_matches_reference_grader(verifier):
    problems = load_responses(VERIFIER_FILE)
    assert len(problems) == 100 and all(len(p.responses) == 8 for p in problems)
    result = score(problems, verifier, ks=(1, 4, 8))
    assert result.responses == 800 and result.n == 8
    assert abs(result.correct - 728) <= 1  # the reference grader's 728/800, +-1 response
    assert result.avg == pytest.approx(result.correct / 800)
    labels = [json.loads(line)["score"] for line in VERIFIER_FILE.open()]
    ours = [pp["correct"] for pp in result.per_problem]
    agree = sum(a == b for la, lo in zip(labels, ours) for a, b in zip(la, lo))
    assert agree >= 799
    assert result.pass_at[1] == pytest.approx(result.avg)
    assert result.pass_at[1] <= result.pass_at[4] <= result.pass_at[8]


def _synthetic(tmp_path) -> Path:
    rows = [
        {"question": "1+1?", "gt": "2", "response": ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}", "no idea"]},
        {"question": "2+2?", "gt": "4", "response": ["\\boxed{5}", "\\boxed{5}", "\\boxed{3}", "\\boxed{1}"]},
    ]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pass_at_k_by_hand(tmp_path, verifier):
    result = score(load_responses(_synthetic(tmp_path)), verifier, ks=(1, 2, 4, 8))
    assert result.correct == 2 and result.responses == 8
    assert result.avg == pytest.approx((2 / 4 + 0) / 2)
    assert result.pass_at[1] == pytest.approx(0.25)
    # problem 1: n=4, c=2 -> pass@2 = 1 - C(2,2)/C(4,2) = 5/6; problem 2: 0
    assert result.pass_at[2] == pytest.approx((5 / 6) / 2)
    assert result.pass_at[4] == pytest.approx(0.5)
    assert 8 not in result.pass_at  # k > n is not reported
    assert result.per_problem[0]["correct"] == [True, False, True, False]
    table = format_table([result])
    assert "pass@2" in table and "25.0" in table and "41.7" in table


def test_eval_cli_scoring_mode(tmp_path, capsys):
    from scope_mega.cli import main

    out = tmp_path / "res" / "eval.json"
    assert main(["eval", "--responses", str(_synthetic(tmp_path)), "-k", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "responses" in printed and "pass@2" in printed
    data = json.loads(out.read_text())
    assert data["responses"]["avg@n"] == pytest.approx(0.25)
    assert data["responses"]["pass_at"]["pass@2"] == pytest.approx(5 / 12)


class StubEngine:
    """Returns fixed texts: for the prompt of problem i, `texts[i]` (n of them, cycled)."""

    def __init__(self, texts_by_prompt: dict[str, list[str]], decode):
        self.texts = texts_by_prompt
        self.decode = decode
        self.calls = []

    def generate(self, prompt_token_ids, sampling):
        self.calls.append(len(prompt_token_ids))
        out = []
        for ids in prompt_token_ids:
            texts = self.texts[self.decode(ids)]
            out.append(
                [Completion([1], [0.0], "stop", None, texts[j % len(texts)]) for j in range(sampling.n)]
            )
        return out


def test_engine_eval_with_stub(verifier):
    encode = lambda s: [ord(c) for c in s]  # noqa: E731
    decode = lambda ids: "".join(map(chr, ids))  # noqa: E731
    problems = load_benchmark(BENCH / "aime24.jsonl", limit=5)
    texts = {}
    for i, p in enumerate(problems):  # problem i gets i correct answers out of 4
        texts[render_prompt("qwen-boxed", p.question)] = [
            f"\\boxed{{{p.answer}}}" if j < i else "\\boxed{-1}" for j in range(4)
        ]
    engine = StubEngine(texts, decode)
    result = evaluate_engine(
        engine, encode, problems, SamplingParams(n=4), verifier, "qwen-boxed", ks=(1, 4), batch_size=2
    )
    assert engine.calls == [2, 2, 1]
    assert result.responses == 20 and result.correct == 0 + 1 + 2 + 3 + 4
    assert result.avg == pytest.approx(10 / 20)
    assert result.pass_at[4] == pytest.approx(4 / 5)


def test_engine_eval_tiny_random_hf_model(verifier):
    """A real HFEngine on a tiny random Llama: the plumbing (prompts in, n texts per problem out)."""
    from scope_mega.rollout.factory import make_engine

    vocab = 128
    encode = lambda s: [min(ord(c), vocab - 1) for c in s][-64:]  # noqa: E731
    decode = lambda ids: "".join(chr(max(i, 32)) for i in ids)  # noqa: E731
    hf = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": vocab,
        "max_position_embeddings": 128,
        "eos_token_id": 0,
        "bos_token_id": 1,
    }
    engine = make_engine("hf", hf, decode=decode)
    problems = load_benchmark(BENCH / "gsm8k.jsonl", limit=3)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=0)
    result = evaluate_engine(engine, encode, problems, sampling, verifier, "raw", ks=(1, 2))
    assert result.problems == 3 and result.responses == 6 and result.n == 2
    assert all(len(p.responses) == 2 for p in problems)
    assert 0 <= result.correct <= 6


def test_problem_dataclass_defaults():
    assert Problem("q", "a", 0, "s").responses == []
