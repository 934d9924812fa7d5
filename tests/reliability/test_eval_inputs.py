"""Issue 27, item 10 (eval): every input `scope-mega eval` cannot score is one line naming the file (and
the row) and the fix, with exit status 2; never a traceback, never a silently wrong score."""

from __future__ import annotations

import json

import pytest

from scope_mega.cli import main

GOOD = {"question": "1+1?", "gt": "2", "responses": ["\\boxed{2}"]}


def _write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


BAD_INPUTS = {
    # name -> (file content, or None for no file; what the one line must say)
    "row is a list": (json.dumps(GOOD) + "\n[1, 2]\n", ":2: not a JSON object (an array)"),
    "row is a string": ('"just text"\n', ":1: not a JSON object (a string)"),
    "non-utf8": (b'{"question": "caf\xe9", "gt": "2", "responses": ["2"]}\n', ":1: not UTF-8 text"),
    "missing file": (None, "no such file"),
    "deeply nested": (
        '{"question": "q", "gt": "2", "responses": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        ":1: JSON nested too deeply",
    ),
    "responses null": ('{"question": "q", "gt": "2", "responses": null}\n', 'row 0: "responses" is null'),
    "a response null": (
        '{"question": "q", "gt": "2", "responses": ["2", null]}\n',
        'row 0: "responses" holds null',
    ),
    "reference null": ('{"question": "q", "gt": null, "responses": ["2"]}\n', "row 0: field 'gt' is null"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_unscorable_eval_input_is_one_line_and_exit_2(name, tmp_path, capsys):
    content, expected = BAD_INPUTS[name]
    path = tmp_path / "responses.jsonl"
    if content is not None:
        _write(path, content)
    assert main(["eval", "--responses", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("eval error: ") and str(path) in err and expected in err, err


def test_missing_benchmark_file_is_one_line_before_any_model_loads(tmp_path, capsys):
    """With --model, the benchmark files are read first: a missing one costs no engine start."""
    missing = tmp_path / "absent.jsonl"
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--benchmarks", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"eval error: {missing}: no such file", err
