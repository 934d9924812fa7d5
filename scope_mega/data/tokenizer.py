"""A sentencepiece tokenizer trained at run time on the task corpus (for the tiny CPU models).

BPE rather than unigram: on this tiny, highly repetitive domain BPE merges the fixed keywords
(`numbers:`, `target:`, `answer:`, ` =`, ` +`) into single tokens (~40% shorter sequences than
characters), trains in a few hundredths of a second and segments deterministically; unigram on the same
corpus stays close to characters and trains slower.

Settings that make `decode(encode(text)) == text` exact: identity normalisation, no extra-whitespace
removal, no dummy prefix, "\\n" and "\\t" as user-defined symbols (sentencepiece otherwise treats text as
single lines), and every printable ASCII character required, so texts outside the corpus still round
trip (other characters map to <unk>). `split_digits` keeps every digit its own token, which helps
arithmetic. `vocab_size` is an upper bound (`hard_vocab_limit=False`): BPE stops when no merge is left.
"""

from __future__ import annotations

import io
import os
import string
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILENAME = "tokenizer.model"
_REQUIRED_CHARS = string.ascii_letters + string.digits + string.punctuation


class Tokenizer:
    """Thin wrapper over a SentencePieceProcessor: plain encode/decode without BOS/EOS, and offsets."""

    def __init__(self, processor: spm.SentencePieceProcessor) -> None:
        self.processor = processor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a response (as `HFTokenizer.stop_token_ids`): EOS only."""
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def save(self, folder: str | os.PathLike) -> None:
        """Write the model as `folder/tokenizer.model`, where `load_tokenizer` reads it."""
        (Path(folder) / MODEL_FILENAME).write_bytes(self.processor.serialized_model_proto())

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode(list(ids))

    def token_offsets(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """Character span `[start, end)` of each token in `decode(ids)` (empty for BOS/EOS/PAD), so
        text positions (e.g. step boundaries) map to token positions."""
        pieces = self.processor.decode(list(ids), return_type="proto").pieces
        offsets, pos = [], 0
        for piece in pieces:
            offsets.append((pos, pos + len(piece.surface)))
            pos += len(piece.surface)
        return offsets


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 256) -> Tokenizer:
    """Train a BPE model on `texts` (whole documents; newlines are kept) and write
    `out_dir/tokenizer.model` atomically (temp file, then rename). Ids: unk 0, bos 1, eos 2, pad 3.
    `vocab_size` must cover the ~100 required characters and special tokens."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=_REQUIRED_CHARS,
        user_defined_symbols=["\n", "\t"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        split_by_whitespace=False,
        split_by_unicode_script=False,
        max_sentence_length=1 << 20,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILENAME}.tmp-{os.getpid()}"
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out / MODEL_FILENAME)
    return Tokenizer(spm.SentencePieceProcessor(model_proto=buffer.getvalue()))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from a `tokenizer.model` file or a directory containing one."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILENAME
    return Tokenizer(spm.SentencePieceProcessor(model_file=str(path)))
