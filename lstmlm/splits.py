"""A corpus's split into training, validation and test text (`[data] split`): token counts
('90M,5M,5M') or fractions of the text ('0.9,0.05,0.05'). No torch."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kMG]?)")
_SCALE = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


@dataclass(frozen=True)
class SplitSizes:
    sizes: tuple[float, ...]  # train, validation[, test]
    fractions: bool  # of the text; else token counts


def parse_split(text: str) -> SplitSizes:
    """'90M,5M,5M' → token counts (90e6, 5e6, 5e6); '0.9,0.05,0.05' → fractions of the text.
    Two or three parts (train, validation[, test]); counts are whole numbers, fractions sum to at most 1."""
    parts = text.replace(" ", "").replace("_", "").split(",")
    where = "[data] split"
    if not 2 <= len(parts) <= 3:
        raise ConfigError(f"{where} must give train and validation sizes, and optionally test: '90M,5M,5M' or '0.9,0.1'; not {text!r}")
    matches = [_SIZE.fullmatch(p) for p in parts]
    if any(m is None for m in matches):
        raise ConfigError(f"{where} sizes are token counts (k, M, G: thousands, millions, billions) or fractions; not {text!r}")
    fractions = all("." in m.group(1) and not m.group(2) for m in matches if m)
    values = tuple(float(m.group(1)) * _SCALE[m.group(2)] for m in matches if m)
    if fractions:
        if sum(values) > 1.0 + 1e-9 or values[0] <= 0:
            raise ConfigError(f"{where} fractions must be positive for training and sum to at most 1; not {text!r}")
        return SplitSizes(values, True)
    if any(v != int(v) for v in values) or values[0] < 1:
        raise ConfigError(f"{where} counts must be whole numbers of tokens, at least 1 for training; not {text!r}")
    return SplitSizes(values, False)
