"""Step segmentation: a response split into steps, each with its character span and token span.

Steps are the pieces of `text.split(delimiter)`; trailing whitespace-only pieces are dropped, interior
empty pieces are kept (malformed steps), so with "\\n" this matches `countdown.split_steps`. The final
answer line is a step like any other. A step's *segment* is its text plus the delimiter after it,
`[start, next step's start)`; segments tile the text and the last one runs to its end.

Token rule (a step boundary may fall inside a token): a token belongs to the step whose segment holds
its LAST character; a zero-width token (EOS) belongs to the step holding its position, and one at the
end of the text to the last step. Each step's tokens are then contiguous, and cutting a response
before step k's tokens keeps only characters of steps < k: the on-policy prefix of a salvaged
trajectory never contains a character of the wrong step. Characters of steps < k carried by a token
that straddles the boundary are not in the kept prefix; guides re-emit them (`GuideRequest.pending_text`).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class TokenizerLike(Protocol):
    """What SCOPE needs from a tokenizer (`data.tokenizer.Tokenizer` is one)."""

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_offsets(self, ids: Sequence[int]) -> list[tuple[int, int]]: ...


@dataclass(frozen=True)
class StepSpan:
    """One step: its text (delimiter excluded), character span `[start, end)` of that text, token span
    `[token_start, token_end)`, and `token_char_start`, the character where its first token starts
    (<= start; the kept prefix when cutting before this step is `text[:token_char_start]`)."""

    text: str
    start: int
    end: int
    token_start: int
    token_end: int
    token_char_start: int


def split_steps(text: str, delimiter: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` of the steps of `text` (see the module docstring)."""
    if not delimiter:
        raise ValueError("delimiter must be non-empty")
    spans, pos = [], 0
    while True:
        i = text.find(delimiter, pos)
        spans.append((pos, len(text) if i < 0 else i))
        if i < 0:
            break
        pos = i + len(delimiter)
    while spans and not text[spans[-1][0] : spans[-1][1]].strip():
        spans.pop()
    return spans


def segment_steps(text: str, delimiter: str, offsets: Sequence[tuple[int, int]]) -> list[StepSpan]:
    """Steps of a response with token spans; `offsets` are the response tokens' character spans in
    `text` (`tokenizer.token_offsets(response_ids)`, so `text` must be the decoding of those ids)."""
    covered = max((e for _, e in offsets), default=0)
    if covered != len(text):
        raise ValueError(f"token offsets end at {covered}, text has {len(text)} chars")
    spans = split_steps(text, delimiter)
    anchors = [e - 1 if e > s else s for s, e in offsets]  # non-decreasing: offsets are contiguous
    firsts = [0] + [bisect.bisect_left(anchors, s) for s, _ in spans[1:]]
    lasts = firsts[1:] + [len(offsets)]
    return [
        StepSpan(text[s:e], s, e, a, b, offsets[a - 1][1] if a > 0 else 0)
        for (s, e), a, b in zip(spans, firsts, lasts)
    ]
