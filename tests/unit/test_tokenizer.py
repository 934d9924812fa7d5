"""Run-time sentencepiece tokenizer: exact round trips, single-digit tokens, offsets, files."""

import random

import pytest

from scope_mega.data.countdown import TaskConfig, make_problems, random_solution, split_steps
from scope_mega.data.tokenizer import MODEL_FILENAME, load_tokenizer, train_tokenizer


def _texts(n, seed, cfg=None):
    rng = random.Random(seed)
    return [p.prompt() + random_solution(p, rng) for p in make_problems(n, seed, cfg)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(_texts(3000, 0), out, vocab_size=256), out


@pytest.fixture(scope="module")
def unseen():
    """Texts the tokenizer was not trained on: harder problems, odd whitespace, other ASCII."""
    texts = _texts(200, 11, TaskConfig(max_numbers=5, max_value=12, max_target=200, ops=("+", "-", "*", "/")))
    texts += [
        "",
        "\n",
        "\n\n\n",
        " ",
        "   leading and trailing spaces   ",
        "7  +   9 = 16\n\n\nanswer:  16\n",
        "a\tb\t\n c",
        "0123456789 1000000 007",
        "Question: what is 2+2? {x: [1, 2]} ~`!@#$%^&*()_-=|\\;'\"<>,./",
    ]
    return texts


def test_round_trip_is_exact(trained, unseen):
    tok, _ = trained
    for text in _texts(500, 0) + unseen:
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_digits_are_single_tokens(trained, unseen):
    tok, _ = trained
    for digit in "0123456789":
        assert len(tok.encode(digit)) == 1
    for text in _texts(200, 1) + unseen:
        for i in tok.encode(text):
            piece = tok.decode([i])
            assert not any(ch.isdigit() for ch in piece) or len(piece) == 1, repr(piece)


def test_keywords_merge_and_newline_is_its_own_token(trained):
    tok, _ = trained
    text = _texts(1, 5)[0]
    assert len(tok.encode(text)) < 0.75 * len(text)  # BPE merges the fixed keywords
    for word in ("numbers:", "target:", "answer:"):
        assert len(tok.encode(word)) == 1
    for i in tok.encode(text):
        piece = tok.decode([i])
        assert "\n" not in piece or piece == "\n"


def test_special_ids_and_vocab(trained):
    tok, _ = trained
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert 100 < tok.vocab_size <= 256
    ids = tok.encode("1 + 2 = 3")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "1 + 2 = 3"


def test_token_offsets_match_decode_and_map_steps_to_tokens(trained, unseen):
    tok, _ = trained
    for text in _texts(100, 2) + unseen:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id, tok.pad_id]
        offsets = tok.token_offsets(ids)
        decoded = tok.decode(ids)
        assert len(offsets) == len(ids)
        assert offsets[0] == (0, 0) and offsets[-1] == (len(decoded), len(decoded))
        pos = 0
        for i, (start, end) in zip(ids, offsets):
            assert start == pos and end >= start
            assert decoded[start:end] == tok.decode([i])
            pos = end
        assert pos == len(decoded) == len(text)
    # every step boundary of a response is a token boundary
    response = random_solution(make_problems(1, 3)[0], random.Random(0))
    ids = tok.encode(response)
    starts = {s for s, _ in tok.token_offsets(ids)}
    pos = 0
    for line in split_steps(response):
        assert pos in starts
        pos += len(line) + 1


def test_files_are_written_atomically_and_reload(trained, tmp_path):
    tok, out = trained
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILENAME]
    text = _texts(1, 9)[0]
    for loaded in (load_tokenizer(out), load_tokenizer(out / MODEL_FILENAME)):
        assert loaded.encode(text) == tok.encode(text) and loaded.vocab_size == tok.vocab_size
    again = train_tokenizer(_texts(3000, 0), tmp_path, vocab_size=256)  # deterministic training
    assert (tmp_path / MODEL_FILENAME).read_bytes() == (out / MODEL_FILENAME).read_bytes()
    assert again.encode(text) == tok.encode(text)
