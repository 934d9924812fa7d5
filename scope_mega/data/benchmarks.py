"""Math benchmarks as JSON Lines, and the prompt templates that put their questions to a model.

Benchmarks are in the formats of the Qwen2.5-Math evaluation suite; field names differ per set, so
ONE table (`FORMATS`) says where each set keeps its question and its reference answer and how to turn
the stored answer into a string the `MathVerifier` accepts:

| format        | question   | reference                                  |
|---------------|------------|--------------------------------------------|
| aime24        | `problem`  | `answer`                                   |
| amc23         | `question` | `answer` (a float: 27.0 -> "27")           |
| minerva_math  | `problem`  | last `\\boxed{...}` inside `solution`       |
| olympiadbench | `question` | `final_answer` (list of strings, joined)   |
| gsm8k         | `question` | `answer`, text after the last `#### `      |
| math_cot      | `question` | `gt` (saved-response files, e.g. verifier/) |

The format is told (`format=`) or detected: first from the file name (`aime24.jsonl` -> aime24),
then from the first row's fields (`detect_format`). `load_benchmark` reads a benchmark's problems;
`load_responses` reads a file of saved responses per problem (`response` or `responses`) next to its
reference. A file that does not fit raises `EvalDataError`.

Prompts: `render_prompt(template, question)` with a template named in `TEMPLATES` (the boxed-answer
instruction in the chat formats of Qwen and Llama 3, or plain) or a literal one containing
`{question}`. The math task (`tasks`) and the `eval` command render their prompts with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_mega.rewards.math_verifier import extract_boxed


class EvalDataError(ValueError):
    """A benchmark or responses file that does not fit the expected format."""


def _plain(value: Any) -> str:
    return str(value).strip()


def _number(value: Any) -> str:
    """27.0 -> "27"; other floats keep their shortest repr."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _last_boxed(value: Any) -> str:
    boxed = extract_boxed(str(value))
    if boxed is None:
        raise EvalDataError("no \\boxed{...} in the solution")
    return boxed


def _joined_list(value: Any) -> str:
    items = value if isinstance(value, list) else [value]
    return ", ".join(str(v).strip().strip("$").strip() for v in items)


def _after_hashes(value: Any) -> str:
    text = str(value)
    if "####" not in text:
        raise EvalDataError("no '#### ' final-answer marker in the answer")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


@dataclass(frozen=True)
class BenchmarkFormat:
    question: str
    answer: str
    convert: Callable[[Any], str]


FORMATS: dict[str, BenchmarkFormat] = {
    "aime24": BenchmarkFormat("problem", "answer", _plain),
    "amc23": BenchmarkFormat("question", "answer", _number),
    "minerva_math": BenchmarkFormat("problem", "solution", _last_boxed),
    "olympiadbench": BenchmarkFormat("question", "final_answer", _joined_list),
    "gsm8k": BenchmarkFormat("question", "answer", _after_hashes),
    "math_cot": BenchmarkFormat("question", "gt", _plain),
}


def detect_format(row: dict[str, Any], filename: str | None = None) -> str:
    """The `FORMATS` key for a file: its stem when that names a format, else from the row's fields."""
    if filename is not None:
        stem = Path(filename).name.split(".")[0].lower()
        if stem in FORMATS:
            return stem
    if "final_answer" in row:
        return "olympiadbench"
    if "gt" in row and "question" in row:
        return "math_cot"
    answer = row.get("answer")
    if "question" in row and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return "amc23"
    if "question" in row and isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if "problem" in row and "answer" in row:
        return "aime24"
    if "problem" in row and "solution" in row:
        return "minerva_math"
    raise EvalDataError(
        f"cannot detect the benchmark format from fields {sorted(row)}; pass format= one of "
        f"{', '.join(FORMATS)}"
    )


@dataclass
class Problem:
    question: str
    answer: str  # the reference answer as the verifier takes it
    index: int  # row number in its file
    source: str  # benchmark name
    responses: list[str] = field(default_factory=list)  # scoring mode: saved responses


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not rows:
        raise EvalDataError(f"{path} has no rows")
    return rows


def _to_problems(
    rows: list[dict[str, Any]], path: Path, fmt: str | None, name: str | None
) -> tuple[str, list[Problem]]:
    fmt = fmt or detect_format(rows[0], path.name)
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    source = name or path.name.split(".")[0]
    problems = []
    for i, row in enumerate(rows):
        for key in (spec.question, spec.answer):
            if key not in row:
                raise EvalDataError(f"{path} row {i}: format {fmt} needs field '{key}'")
        try:
            answer = spec.convert(row[spec.answer])
        except EvalDataError as e:
            raise EvalDataError(f"{path} row {i}: {e}") from None
        problems.append(Problem(str(row[spec.question]), answer, i, source))
    return fmt, problems


def load_benchmark(path: str | Path, format: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of one benchmark file (format told or detected), optionally the first `limit`."""
    path = Path(path)
    rows = _read_jsonl(path)[:limit]
    return _to_problems(rows, path, format, None)[1]


RESPONSE_FIELDS = ("responses", "response", "completions")


def load_responses(path: str | Path, format: str | None = None) -> list[Problem]:
    """Problems with saved responses (a list under `responses`/`response`/`completions`); the
    question/reference fields follow `FORMATS` (detected or told), e.g. verifier/math_cot_100.jsonl."""
    path = Path(path)
    rows = _read_jsonl(path)
    _, problems = _to_problems(rows, path, format, None)
    for problem, row in zip(problems, rows):
        key = next((k for k in RESPONSE_FIELDS if k in row), None)
        if key is None:
            raise EvalDataError(
                f"{path} row {problem.index}: no responses field ({', '.join(RESPONSE_FIELDS)})"
            )
        value = row[key]
        problem.responses = [str(r) for r in (value if isinstance(value, list) else [value])]
    return problems


# ----------------------------------------------------------------------------- prompts

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES: dict[str, str] = {
    # Qwen2.5-Math's CoT evaluation prompt (ChatML).
    "qwen-boxed": (
        "<|im_start|>system\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    # Llama 3 chat format with the same instruction.
    "llama3-boxed": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{question}\n"
        + BOXED_INSTRUCTION
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "plain": "Question: {question}\n" + BOXED_INSTRUCTION + "\nAnswer: ",
    "raw": "{question}",
}


def resolve_template(template: str) -> str:
    """A template name from `TEMPLATES`, or a literal template containing `{question}`."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{question}" not in template:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)} or contain '{{question}}'")
    return template


def render_prompt(template: str, question: str) -> str:
    return resolve_template(template).replace("{question}", question)
