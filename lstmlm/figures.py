"""Figures read back from a run's JSON files (run.json, metrics.jsonl, baselines.json), which a
crash, a hand edit or another program may have left as anything: each reader here gives a
figure only where the value is one. JSON's digits spell integers no float holds, which math and
formatting cannot take (OverflowError): the checks only compare, never convert, and NaN fails
every comparison. A bool is no figure, though Python counts it an int."""

from __future__ import annotations

import sys
from typing import Any

FIGURES = (int, float)  # a figure's type (not bool, whose type is its own)
LARGEST = sys.float_info.max


def at_least(value: Any, least: float) -> bool:
    """Whether `value` is a figure from `least` up that a float holds."""
    return type(value) in FIGURES and least <= value <= LARGEST


def number(value: Any, default: float | None = None) -> Any:
    """A finite figure, else `default` (null, a string, a bool: not figures)."""
    return value if at_least(value, -LARGEST) else default


def count(value: Any) -> int | None:
    """A count (epochs, tokens), else None."""
    return value if type(value) is int and 0 <= value <= LARGEST else None


def perplexity(value: Any) -> float | None:
    """A perplexity, else None: the exp of a mean cross-entropy is never below 1 (a figure that
    is cannot be one, and has no bits per character)."""
    return value if at_least(value, 1) else None
