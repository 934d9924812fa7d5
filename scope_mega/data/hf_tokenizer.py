"""A Hugging Face `transformers` tokenizer behind the interface of the project's sentencepiece
`Tokenizer`, so the trainer and SCOPE run real models (Qwen2, Llama-3, ...) with the same code.

The hard part is `token_offsets`: SCOPE cuts a response at a step boundary by character position, so
each token's span must reproduce `decode(ids)` exactly. Byte-level BPE tokenizers (GPT-2 alphabet:
Qwen2, Llama-3) get an O(n) path that replays the byte-level decoder: each token string maps back to its
bytes, an incremental UTF-8 decoder consumes them, and a token ends where the text decoded so far ends:
a character split over several tokens belongs to the one holding its last byte, a U+FFFD for bytes that
form no character to the one holding the first of them. That is the rule of `prefix_decode_offsets`
(token i ends where `decode(ids[: i + 1])` stops agreeing with `decode(ids)`), which every other
tokenizer uses, quadratic but exact by construction; the fast path's text is checked against
`decode(ids)` and falls back to it on any difference.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from scope_mega.data.tokenizer import MODEL_FILENAME, Tokenizer, load_tokenizer

# Tokens that end a generated response in the common chat formats (ChatML, GPT-2/Qwen, Llama-3).
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level table, character -> byte: printable Latin-1 bytes stand for themselves, the
    other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def prefix_decode_offsets(decode: Callable[[list[int]], str], ids: Sequence[int]) -> list[tuple[int, int]]:
    """Offsets for any tokenizer: token i ends where `decode(ids[: i + 1])` stops agreeing with
    `decode(ids)` (kept non-decreasing), so spans are contiguous and end at `len(decode(ids))`."""
    ids = list(ids)
    text = decode(ids)
    ends, end = [], 0
    for i in range(1, len(ids) + 1):
        end = max(end, _common_prefix_len(decode(ids[:i]), text))
        ends.append(end)
    return _spans(ends)


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix; a prefix of `b` (the usual case) is checked at C speed."""
    return len(a) if b.startswith(a) else len(os.path.commonprefix([a, b]))


def _spans(ends: list[int]) -> list[tuple[int, int]]:
    return [(ends[i - 1] if i else 0, e) for i, e in enumerate(ends)]


class HFTokenizer:
    """A transformers tokenizer with `data.tokenizer.Tokenizer`'s interface: plain encode (no special
    tokens added), decode (special tokens skipped, no clean-up of spaces), exact `token_offsets`, and
    the ids the trainer needs. The wrapped tokenizer (`hf`) must not change after wrapping."""

    def __init__(self, tokenizer: Any) -> None:
        self.hf = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no eos_token: cannot tell where a response ends"
            )
        self.vocab_size: int = len(tokenizer)
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.bos_id: int | None = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        self.pad_id: int = self.eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        vocab = tokenizer.get_vocab()
        self.stop_token_ids: list[int] = list(
            dict.fromkeys([self.eos_id, *(vocab[t] for t in STOP_TOKENS if t in vocab)])
        )
        self._backend = _byte_level_backend(tokenizer)
        self._token_bytes: dict[int, bytes] = {}
        if self._backend is not None:  # what the backend's decode drops with skip_special_tokens
            added = self._backend.get_added_tokens_decoder()
            self._special = {i for i, token in added.items() if token.special}

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> HFTokenizer:
        """Load the tokenizer saved in a model directory (`AutoTokenizer`, nothing downloaded)."""
        import transformers

        return cls(transformers.AutoTokenizer.from_pretrained(path, local_files_only=True))

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer's files into `folder` (as `save_pretrained`), where `from_dir` reads them."""
        self.hf.save_pretrained(folder)

    @property
    def is_byte_level(self) -> bool:
        """Whether `token_offsets` can take the O(n) byte-level path."""
        return self._backend is not None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_offsets(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """Character span `[start, end)` of each token in `decode(ids)`: contiguous, zero-width for
        special tokens, the last ending at `len(decode(ids))` (see the module docstring)."""
        ids = [int(i) for i in ids]
        if self._backend is not None:
            text, ends = self._byte_level_ends(ids)
            if text == self.decode(ids):
                return _spans(ends)
        return prefix_decode_offsets(self.decode, ids)

    def _byte_level_ends(self, ids: list[int]) -> tuple[str, list[int]]:
        """The text the byte-level decoder makes of `ids`, and where each token ends in it by the rule
        of `prefix_decode_offsets`: decoded text never changes once emitted, so a prefix's decoding is
        the text emitted so far plus what its pending bytes (< 4) would flush to (U+FFFD)."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        probe = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces, emitted, flushed, length = [], [], [], 0
        for token_id in ids:
            data = self._bytes_of(token_id)
            if data:
                pieces.append(decoder.decode(data))
                length += len(pieces[-1])
            emitted.append(length)
            pending = decoder.getstate()
            if pending[0]:
                probe.setstate(pending)
            flushed.append(probe.decode(b"", final=True) if pending[0] else "")
        text = "".join(pieces) + decoder.decode(b"", final=True)
        ends, end = [], 0
        for start, tail in zip(emitted, flushed):
            end = max(end, start + _common_prefix_len(tail, text[start:]))
            ends.append(end)
        return text, ends

    def _bytes_of(self, token_id: int) -> bytes:
        """The bytes the ByteLevel decoder turns a token into: its characters mapped through the
        alphabet, or its raw UTF-8 when one is outside it (added tokens); nothing for specials."""
        data = self._token_bytes.get(token_id)
        if data is None:
            token = self._backend.id_to_token(token_id)
            if token is None or token_id in self._special:
                data = b""
            else:
                alphabet = byte_level_alphabet()
                in_alphabet = all(c in alphabet for c in token)
                data = bytes(alphabet[c] for c in token) if in_alphabet else token.encode("utf-8")
            self._token_bytes[token_id] = data
        return data


def _byte_level_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers` backend of a fast tokenizer whose decoder is plain ByteLevel, else None."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and isinstance(backend.decoder, decoders.ByteLevel) else None


def load_model_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer stored with a model: the project's sentencepiece `tokenizer.model` (tiny models
    trained here) when the directory has one, else the transformers tokenizer saved there."""
    path = Path(path)
    if (path / MODEL_FILENAME).is_file():
        return load_tokenizer(path)
    return HFTokenizer.from_dir(path)
