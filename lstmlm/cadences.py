"""When training validates, samples and saves, and when its time is up.

Each of the three has its cadence (`Cadence`, a config value parsed once): every N steps, every N minutes, at every
N-th epoch end, or whichever of those comes first — so an epoch of a 10 GB corpus, which can
take a day, is checkpointed every few minutes like an epoch of a 1 MB one. Minutes, and the
session's `max_minutes`, count on one clock from the session's start; under torchrun the
processes agree on what the clock says with one collective a step (`distributed.max_each`), the
time used included: a cosine schedule anneals by it, and each process's own clock would give
each its own learning rate, the replicas drifting apart.

This module imports no torch (config reads `Cadence` from it, and `lstmlm runs` reads configs):
the collective is imported where a training uses it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config
    from .distributed import World

_CADENCE_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([mhe]?)")


@dataclass(frozen=True)
class Cadence:
    """Every `steps` optimizer steps, every `minutes` minutes, at every `epochs`-th epoch end —
    whichever of those given comes first (a part that is 0 is absent; all 0: never).

    Written "2000" (steps), "10m" (minutes), "2h" (hours), "1e" (epochs), or several joined by
    commas ("1e,10m"). Steps and epochs count the same on every machine; minutes let one
    setting suit a 1 MB corpus and a 10 GB one alike."""

    steps: int = 0
    minutes: float = 0.0
    epochs: int = 0

    @classmethod
    def parse(cls, value: int | str, what: str = "a cadence") -> Cadence:
        if isinstance(value, bool):
            raise ConfigError(f"{what} must be steps (2000), minutes ('10m') or epochs ('1e'), not {value!r}")
        if isinstance(value, int):
            value = str(value)
        steps, minutes, epochs = 0, 0.0, 0
        for part in str(value).replace(" ", "").split(","):
            m = _CADENCE_PART.fullmatch(part)
            if m is None or (m.group(2) in ("", "e") and "." in m.group(1)):
                raise ConfigError(f"{what} must be steps (2000), minutes ('10m'), hours ('2h') or epochs ('1e'), or several joined by commas; not {value!r}")
            number, unit = m.groups()
            if unit == "m" or unit == "h":
                minutes = float(number) * (60 if unit == "h" else 1)
                if not math.isfinite(minutes):
                    raise ConfigError(f"{what} is too large: {value!r}")
            elif unit == "e":
                epochs = int(number)
            else:
                steps = int(number)
        if steps >= 2**63 or epochs >= 2**63:
            raise ConfigError(f"{what} is too large: {value!r}")
        return cls(steps, minutes, epochs)

    def __str__(self) -> str:
        """The canonical written form, which `parse` reads back to this same cadence."""
        parts = ([str(self.steps)] if self.steps else []) + ([f"{self.epochs}e"] if self.epochs else [])
        if self.minutes:
            parts.append(f"{_positional(self.minutes)}m")
        return ",".join(parts) or "0"

    @property
    def never(self) -> bool:
        return not (self.steps or self.minutes or self.epochs)


def _positional(x: float) -> str:
    """`x` in plain decimal digits, the fewest that read back as `x`: never in exponent form
    ("1e+06"), whose "e" would read as epochs, and never rounded (":g" keeps 6 digits)."""
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


VALIDATE, SAMPLE, SAVE = "eval_every", "sample_every", "checkpoint_every"
KEYS = (VALIDATE, SAMPLE, SAVE)


@dataclass(frozen=True)
class Due:
    """What to do between this step and the next."""

    validate: bool = False
    sample: bool = False
    save: bool = False
    stop: str | None = None  # "interrupted" or "time_limit"


class Cadences:
    """The three cadences and the time limit of one training session, on one clock."""

    def __init__(self, cfg: Config, world: World, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cadences: dict[str, Cadence] = {key: cfg.value(key) for key in KEYS}
        self.epochs, self.max_minutes = cfg.train.epochs, cfg.train.max_minutes
        self.world, self.clock = world, clock
        self.started: float | None = None  # when the session began: max_minutes counts from it
        self._last: dict[str, float] = {}  # when each cadence's action last happened (clock seconds)
        self._agreed = 0.0  # under torchrun: the time used, as the processes agreed after the last step

    def start(self) -> None:
        """The session begins now: the time limit and every cadence in minutes count from here."""
        self.started = self.clock()
        self._last = dict.fromkeys(self.cadences, self.started)
        self._agreed = 0.0

    def time_used(self) -> float:
        """The fraction of this session's max_minutes spent; 0 without a limit or before `start`.
        Under torchrun the one every process agreed on after the last step (`due`), so that the
        learning rate it sets is the same in every process."""
        return self._agreed if self.world.active else self._clock_used()

    def _clock_used(self) -> float:
        if not self.max_minutes or self.started is None:
            return 0.0
        return min(1.0, (self.clock() - self.started) / (self.max_minutes * 60))

    def due(self, global_step: int, epoch: int, ends_epoch: bool, has_val: bool, should_stop: Callable[[], bool], now: float) -> Due:
        """Which cadences are due after this step (`global_step`, in epoch `epoch`, its last
        step when `ends_epoch`), and whether to stop. One collective for the clock's parts,
        so every process decides the same."""
        finishing = ends_epoch and epoch >= self.epochs  # the stop path validates, saves and samples then

        def counted(c: Cadence) -> bool:
            return bool(c.steps and global_step % c.steps == 0) or bool(ends_epoch and c.epochs and epoch % c.epochs == 0)

        def timed(key: str) -> bool:
            minutes = self.cadences[key].minutes
            return bool(minutes) and now - self._last[key] >= minutes * 60

        from .distributed import max_each  # torch: a training's, not a config's

        agreed = max_each([float(should_stop()), self._clock_used(), *(float(timed(k)) for k in KEYS)], self.world)
        interrupted, self._agreed, by_clock = agreed[0] > 0, agreed[1], [v > 0 for v in agreed[2:]]
        out_of_time = self._agreed >= 1.0
        validate, sample, save = (counted(self.cadences[k]) or by_time for k, by_time in zip(KEYS, by_clock))
        for key, fired in zip(KEYS, (validate, sample, save)):
            if fired:
                self._last[key] = now
        stop = "interrupted" if interrupted else "time_limit" if out_of_time else None
        # a training ending with this epoch validates before its record, which then holds that validation
        # (after it, the stop path's would be in no record: metrics.jsonl kept the one before)
        ending = ends_epoch and (finishing or out_of_time)
        return Due(
            # a validation due is made even when interrupted: skipped, it was lost to the resume (epoch records, patience, best.pt)
            validate=(validate or (ending and not interrupted)) and has_val,
            sample=sample and stop is None and not finishing,
            save=save and stop is None,
            stop=stop,
        )
