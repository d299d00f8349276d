"""When training validates, samples and saves, and when its time is up.

Each of the three has its cadence (`config.Cadence`): every N steps, every N minutes, at every
N-th epoch end, or whichever of those comes first — so an epoch of a 10 GB corpus, which can
take a day, is checkpointed every few minutes like an epoch of a 1 MB one. Minutes, and the
session's `max_minutes`, count on one clock from the session's start; under torchrun the
processes agree on what the clock says with one collective a step (`distributed.any_each`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import Cadence, Config, cadence
from .distributed import World, any_each

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

    def __init__(self, cfg: Config, world: World = World(), clock: Callable[[], float] = time.perf_counter) -> None:
        self.cadences: dict[str, Cadence] = {key: cadence(cfg, key) for key in KEYS}
        self.epochs, self.max_minutes = cfg.train.epochs, cfg.train.max_minutes
        self.world, self.clock = world, clock
        self.started: float | None = None  # when the session began: max_minutes counts from it
        self._last: dict[str, float] = {}  # when each cadence's action last happened (clock seconds)

    def start(self) -> None:
        """The session begins now: the time limit and every cadence in minutes count from here."""
        self.started = self.clock()
        self._last = dict.fromkeys(self.cadences, self.started)

    def time_used(self) -> float:
        """The fraction of this session's max_minutes spent; 0 without a limit or before `start`."""
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

        interrupted, out_of_time, *by_clock = any_each([should_stop(), self.time_used() >= 1.0, *(timed(k) for k in KEYS)], self.world)
        validate, sample, save = (counted(self.cadences[k]) or by_time for k, by_time in zip(KEYS, by_clock))
        for key, fired in zip(KEYS, (validate, sample, save)):
            if fired:
                self._last[key] = now
        stop = "interrupted" if interrupted else "time_limit" if out_of_time else None
        return Due(
            validate=validate and has_val and not interrupted,
            sample=sample and stop is None and not finishing,
            save=save and stop is None,
            stop=stop,
        )
