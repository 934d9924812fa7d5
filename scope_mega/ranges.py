"""Numeric ranges of config options, declared once beside each option and checked by one function.

A config dataclass declares a range as field metadata (`steps: int = field(default=30, metadata=ge(0))`)
and derives from `Checked`, whose `__post_init__` runs `check_ranges`: every value must be finite and
inside its field's range, or construction raises `RangeError` ("steps must be >= 0, got -5").
`config.from_dict` prefixes the dotted path of the enclosing section ("rl.steps must be ...").
This module sits at the bottom of the import graph: config dataclasses anywhere can use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

_KEY = "range"


class RangeError(ValueError):
    """A numeric option outside its range; the message starts with the field name."""


@dataclass(frozen=True)
class Range:
    """The interval `lo .. hi` (each end open or closed); None: unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        if self.hi is None:
            return "finite" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


def ge(lo: float) -> dict[str, Range]:
    """Field metadata: at least `lo`."""
    return {_KEY: Range(lo)}


def gt(lo: float) -> dict[str, Range]:
    """Field metadata: more than `lo`."""
    return {_KEY: Range(lo, lo_open=True)}


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> dict[str, Range]:
    """Field metadata: within `lo .. hi`, each end included unless told open."""
    return {_KEY: Range(lo, hi, lo_open, hi_open)}


def finite() -> dict[str, Range]:
    """Field metadata: any finite number (no NaN or infinity)."""
    return {_KEY: Range()}


def check_ranges(obj: Any) -> None:
    """Raise `RangeError` for the first field of dataclass `obj` whose number lies outside the range its
    metadata declares (a field that also takes None or a named choice is only checked on numbers)."""
    for f in dataclasses.fields(obj):
        bounds: Range | None = f.metadata.get(_KEY)
        value = getattr(obj, f.name)
        if bounds is not None and isinstance(value, (int, float)) and value not in bounds:
            raise RangeError(f"{f.name} must be {bounds.describe()}, got {value!r}")


class Checked:
    """Base of config dataclasses: their ranges are checked when they are built. A subclass with its
    own `__post_init__` calls `super().__post_init__()` first."""

    def __post_init__(self) -> None:
        check_ranges(self)
