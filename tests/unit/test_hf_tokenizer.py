"""`HFTokenizer`: ids, plain encode/decode, and token offsets that reproduce `decode` exactly (byte-level
fast path, its check, the prefix-decoding fallback), on tokenizers trained here (nothing downloaded)."""

import random

import pytest
import transformers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.implementations import SentencePieceBPETokenizer

from scope_mega.data.hf_tokenizer import (
    HFTokenizer,
    byte_level_alphabet,
    load_model_tokenizer,
    prefix_decode_offsets,
)
from scope_mega.data.tokenizer import Tokenizer, train_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<extra_0>"]
CORPUS = [
    "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18.\n\n#### 18",
    "Half is ½ and the root is √2, so π r^2 ≈ 3.14 r^2.\n\nThe answer is \\boxed{\\frac{1}{2}}.",
    "数学 题目: 1 + 1 = 2 😀\n\nDone.",
]
TEXTS = [
    "",
    "\n",
    " ½",
    "½√π",
    "x = √(½) ≈ 0.707, and π ≈ 3.14159\n\nso 2π r = 6.28 r",
    "emoji 😀👍🏽 and CJK 数学题目 mixed with ascii\n",
    "Step 1: a + b = 7.\n\nStep 2: 2 * 7 = 14.\n\nThe answer is \\boxed{14}.",
    "   leading spaces, trailing tabs\t\t\n\n\n",
    "unseen: ß ü ñ — “quotes” ∑_{k=1}^{n} k² ∞ ≤ ≥ ≠ 🙂",
]


def byte_level_bpe(vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
    """A Qwen2-style byte-level BPE trained on `CORPUS`, with ChatML specials."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def char_level() -> transformers.PreTrainedTokenizerFast:
    """A WordLevel tokenizer over printable ASCII with Qwen's specials (as the PRM tests use): no decoder."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<unk>", *SPECIALS, *chars])}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return fast


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return HFTokenizer(byte_level_bpe())


def _byte_token(tok: HFTokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte`."""
    char = next(c for c, b in byte_level_alphabet().items() if b == byte)
    return tok.hf.convert_tokens_to_ids(char)


def assert_exact(tok: HFTokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Offsets are contiguous from 0 and end at len(decode(ids)); returns them."""
    text, offsets = tok.decode(ids), tok.token_offsets(ids)
    assert len(offsets) == len(ids)
    assert [s for s, _ in offsets] == [0, *(e for _, e in offsets)][: len(offsets)], offsets
    assert all(s <= e for s, e in offsets)
    assert (offsets[-1][1] if offsets else 0) == len(text)
    return offsets


def count_decodes(monkeypatch, tok: HFTokenizer) -> list[int]:
    """Count calls of the wrapped tokenizer's decode (one call: the fast path was taken)."""
    calls, decode = [], tok.hf.decode
    monkeypatch.setattr(tok.hf, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    return calls


def test_ids_and_stop_tokens(bpe):
    hf = bpe.hf
    im_end, endoftext = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")
    assert bpe.vocab_size == len(hf)
    assert bpe.bos_id is None
    assert (bpe.eos_id, bpe.pad_id) == (im_end, endoftext)
    assert bpe.stop_token_ids == [im_end, endoftext]
    for special in SPECIALS:
        assert bpe.encode(special) == [hf.convert_tokens_to_ids(special)]


def test_pad_defaults_to_eos_and_eos_is_required():
    hf = byte_level_bpe()
    hf.pad_token = None
    tok = HFTokenizer(hf)
    assert tok.pad_id == tok.eos_id
    hf.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        HFTokenizer(hf)


def test_encode_decode_round_trip(bpe):
    for text in TEXTS:
        assert bpe.decode(bpe.encode(text)) == text, repr(text)
    ids = bpe.encode("<|im_start|>a b<extra_0> c<|im_end|>")
    assert ids[0] == bpe.hf.convert_tokens_to_ids("<|im_start|>") and ids[-1] == bpe.eos_id
    assert bpe.decode(ids) == "a b c"  # specials skipped, spaces kept as they are


def test_offsets_reproduce_decode_in_one_pass(bpe, monkeypatch):
    specials = [bpe.hf.convert_tokens_to_ids(t) for t in SPECIALS]
    calls = count_decodes(monkeypatch, bpe)
    for i, text in enumerate(TEXTS):
        for ids in (
            bpe.encode(text),
            [specials[1], *bpe.encode(text), specials[3], *bpe.encode(text), bpe.eos_id],
        ):
            calls.clear()
            offsets = assert_exact(bpe, ids)
            assert len(calls) == 2, "byte-level path not taken"  # decode in the check and in assert_exact
            assert offsets == prefix_decode_offsets(bpe.decode, ids)
            for (s, e), token in zip(offsets, ids):
                if token in specials:
                    assert s == e
        assert bpe.decode(bpe.encode(text)) == text, i


def test_split_characters_and_invalid_bytes(bpe):
    """A character split over tokens belongs to the token with its last byte."""
    a, sep = bpe.encode("a")[0], bpe.hf.convert_tokens_to_ids("<extra_0>")
    half = [_byte_token(bpe, b) for b in "½".encode()]
    emoji = [_byte_token(bpe, b) for b in "😀".encode()]
    cases = [
        ([a, *half], "a½", [(0, 1), (1, 1), (1, 2)]),
        ([a, half[0], sep, half[1], a], "a½a", [(0, 1), (1, 1), (1, 1), (1, 2), (2, 3)]),
        ([*emoji[:2], sep, *emoji[2:]], "😀", [(0, 0), (0, 0), (0, 0), (0, 0), (0, 1)]),
        # bytes that form no character: one U+FFFD, on the token with the first of them
        ([a, *emoji[:2]], "a\ufffd", [(0, 1), (1, 2), (2, 2)]),  # cut mid-character (length limit)
        ([a, *emoji[:3], sep], "a\ufffd", [(0, 1), (1, 2), (2, 2), (2, 2), (2, 2)]),
        ([half[0], a], "\ufffda", [(0, 1), (1, 2)]),
        ([a, emoji[0], sep, half[0], a], "a\ufffd\ufffda", [(0, 1), (1, 2), (2, 2), (2, 3), (3, 4)]),
        ([half[1], half[1]], "\ufffd\ufffd", [(0, 1), (1, 2)]),
    ]
    for ids, text, expected in cases:
        assert bpe.decode(ids) == text
        assert bpe.token_offsets(ids) == expected, text
        assert prefix_decode_offsets(bpe.decode, ids) == expected, text


def test_random_ids_fast_path_equals_prefix_decoding(bpe):
    """Any id sequence (bytes of split and broken characters, specials anywhere) gives the same offsets
    on both paths, and they reproduce decode."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(bpe.vocab_size) for _ in range(rng.randint(1, 24))]
        assert assert_exact(bpe, ids) == prefix_decode_offsets(bpe.decode, ids), ids


def test_added_tokens_take_the_fast_path(monkeypatch):
    """Non-special added tokens: ASCII ones map through the alphabet, others decode as raw UTF-8."""
    tok = HFTokenizer(_with_added_tokens())
    calls = count_decodes(monkeypatch, tok)
    ids = tok.encode("a<think> ½y é\n<|im_end|>b½")
    assert tok.hf.convert_tokens_to_ids(" ½y") in ids
    offsets = assert_exact(tok, ids)
    assert len(calls) == 2
    assert offsets == prefix_decode_offsets(tok.decode, ids)


def _with_added_tokens() -> transformers.PreTrainedTokenizerFast:
    hf = byte_level_bpe()
    hf.add_tokens(["<think>", " ½y"])
    return hf


def test_fast_path_is_checked_against_decode(monkeypatch):
    """A decode the byte-level replay does not match (here: a clean-up) is served by the fallback."""
    tok = HFTokenizer(byte_level_bpe())
    decode = tok.hf.decode
    monkeypatch.setattr(tok.hf, "decode", lambda *a, **k: decode(*a, **k).replace(" .", "."))
    ids = tok.encode("so x = 2 . Then π .\n\n½ .")
    assert tok.decode(ids) == "so x = 2. Then π.\n\n½."
    assert_exact(tok, ids)
    assert tok.token_offsets(ids) == prefix_decode_offsets(tok.decode, ids)


def test_char_level_tokenizer_uses_the_fallback():
    tok = HFTokenizer(char_level())
    assert not tok.is_byte_level
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("<|im_start|>1 + 2 = 3\n\n<extra_0>x<|im_end|>")
    offsets = assert_exact(tok, ids)
    text = tok.decode(ids)
    assert text == " ".join("1 + 2 = 3\n\nx")  # no decoder: the backend joins tokens with spaces
    specials = {tok.hf.convert_tokens_to_ids(t) for t in SPECIALS}
    pieces = [text[s:e] for (s, e), i in zip(offsets, ids) if i not in specials]
    assert pieces == [("" if k == 0 else " ") + c for k, c in enumerate("1 + 2 = 3\n\nx")]


def test_sentencepiece_style_tokenizer_uses_the_fallback():
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS * 5, vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok = HFTokenizer(
        transformers.PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>")
    )
    assert not tok.is_byte_level
    for text in TEXTS + ["½ is half\n\nand √4 = 2"]:
        ids = [*tok.encode(text), tok.eos_id]
        assert_exact(tok, ids)


def test_load_model_tokenizer(tmp_path):
    byte_level_bpe().save_pretrained(tmp_path / "hf")
    loaded = load_model_tokenizer(tmp_path / "hf")
    assert isinstance(loaded, HFTokenizer) and loaded.is_byte_level
    assert loaded.decode(loaded.encode(TEXTS[4])) == TEXTS[4]
    train_tokenizer(["numbers: 1 2\nanswer: 3\n"] * 20, tmp_path / "sp", vocab_size=120)
    sp = load_model_tokenizer(tmp_path / "sp")
    assert isinstance(sp, Tokenizer) and sp.stop_token_ids == [sp.eos_id]
