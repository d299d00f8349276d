"""What a continuation asks for: `Sampling`, the one declaration the command line's options and
the HTTP API's request derive from (each field with its help and bounds). No torch: `lstmlm
--help` reads it. Choosing the characters it asks for, for every row at once, is `choosing.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError
from .fields import option, wrong_type

SAMPLE_LENGTH = 50  # characters per training sample, as d2l
D2L_PREFIXES = ("time traveller", "traveller")  # what d2l continues; the first, what `generate` continues by default
SEEDS = 2**64  # what torch.Generator takes: 0 to 2**64 - 1
# The most a row's settings hold where they become tensors (choosing.Rows): float32's largest
# temperature, int64's largest top-k. Past them a batch's step failed, and ended every row in it.
# A count past int64 (a length, a number of samples) is no list's or tensor's size either.
MOST_TEMPERATURE, MOST_COUNT = 3.4028234663852886e38, 2**63 - 1


@dataclass(frozen=True)
class Sampling:
    """How to continue a prefix: `length` characters for each of `num_samples` continuations;
    temperature 0 is greedy, above 0 samples (top-k, top-p and min-p cut the candidates; `seed`
    repeats). A sample ends early at the first of the `stop` strings, which is left out."""

    length: int = option(SAMPLE_LENGTH, "Characters to generate.", low=0, high=MOST_COUNT)
    temperature: float = option(0.0, "0 = greedy (the seed); > 0 samples.", low=0.0, high=MOST_TEMPERATURE)
    top_k: int = option(0, "Sample among the k most likely characters (0 = all).", low=0, high=MOST_COUNT)
    top_p: float = option(1.0, "Sample within this probability mass (the most likely character always stays).", low=0.0, high=1.0)
    num_samples: int = option(1, "Independent continuations (sample i is what --seed SEED+i gives alone).", low=1, high=MOST_COUNT)
    seed: int | None = option(None, "Seed for sampling (same seed, same text).", low=0, high=SEEDS - 1)
    min_p: float = option(0.0, "Keep characters at least this share as likely as the likeliest (0 = all).", low=0.0, high=1.0)
    stop: tuple[str, ...] = option((), "End a sample at this string, left out (repeatable).")

    def __post_init__(self) -> None:
        for f in fields(self):  # a library caller's wrong type, refused by name before it fails deep in a step
            expected = wrong_type(f, getattr(self, f.name))
            if expected:
                raise ConfigError(f"{f.name} must be {expected}, not {getattr(self, f.name)!r}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):  # a str would be a stop string a character
            raise ConfigError(f"stop must be a tuple of strings, not {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))  # a list given: frozen, so hashable
        if self.seed is not None and not 0 <= self.seed < SEEDS:
            raise ConfigError(f"--seed must be from 0 to 2**64 - 1, not {self.seed}")
        for f in fields(self):
            value, low, high = getattr(self, f.name), f.metadata["low"], f.metadata["high"]
            if f.name == "seed" or not isinstance(value, (int, float)):
                continue
            if high is not None and not low <= value <= high:
                raise ConfigError(f"{f.name} must lie in [{low}, {high}], not {value}")
            if low is not None and value < low:
                raise ConfigError(f"{f.name} must be at least {low}, not {value}")
        if any(not s for s in self.stop):
            raise ConfigError("a stop string must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def row_seed(sampling: Sampling, i: int) -> int | None:
    """The seed of continuation i: the seed, then one more per continuation (wrapping at 2**64)."""
    return None if sampling.seed is None else (sampling.seed + i) % SEEDS
