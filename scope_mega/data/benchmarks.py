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
`load_responses` reads a file of saved responses per problem (`response` or `responses`, a text or a
list of texts) next to its reference. Whatever cannot be scored as it is raises `EvalDataError`, one
line naming the file (and its line or row): a missing or unreadable file, a line that is not UTF-8, not
JSON, nested too deeply to parse or not a JSON object, a missing or null question or reference, and
responses that are null, empty or not texts (a null response is refused, not scored as the text
"None": it is a generation that failed, and counting it as a wrong answer would hide that).

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


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file, one per non-blank line. A file that is missing or
    unreadable, a line that is not UTF-8, not JSON, nested too deeply for the parser or not an object
    raises `EvalDataError` naming the file and line."""
    rows = []
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    message = f"{path}:{lineno}: not UTF-8 text (byte {e.start}); save it as UTF-8"
                    raise EvalDataError(message) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                except RecursionError:
                    raise EvalDataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
                if not isinstance(row, dict):
                    raise EvalDataError(
                        f"{path}:{lineno}: not a JSON object ({_json_type(row)}); each line must be one "
                        "object with a problem's fields"
                    )
                rows.append(row)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: no such file") from None
    except OSError as e:  # a directory, no permission
        raise EvalDataError(f"{path}: cannot read it ({e.strerror})") from None
    if not rows:
        raise EvalDataError(f"{path} has no rows")
    return rows


def _to_problems(
    rows: list[dict[str, Any]], path: Path, fmt: str | None, name: str | None
) -> tuple[str, list[Problem]]:
    try:
        fmt = fmt or detect_format(rows[0], path.name)
    except EvalDataError as e:
        raise EvalDataError(f"{path}: {e}") from None
    if fmt not in FORMATS:
        raise EvalDataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    source = name or path.name.split(".")[0]
    problems = []
    for i, row in enumerate(rows):
        for key in (spec.question, spec.answer):
            if key not in row:
                raise EvalDataError(f"{path} row {i}: format {fmt} needs field '{key}'")
            if row[key] is None:
                raise EvalDataError(f"{path} row {i}: field '{key}' is null; format {fmt} needs its value")
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
        if value is None:
            raise EvalDataError(f'{path} row {problem.index}: "{key}" is null; give a list of response texts')
        responses = value if isinstance(value, list) else [value]
        if not responses:
            raise EvalDataError(f'{path} row {problem.index}: "{key}" is empty; give at least one response')
        odd = [r for r in responses if not isinstance(r, str)]
        if odd:
            raise EvalDataError(
                f'{path} row {problem.index}: "{key}" holds {_json_type(odd[0])}; each response must be text'
            )
        problem.responses = responses
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
