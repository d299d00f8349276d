"""What a study searches: SPACE, the config fields sampled and their ranges, each `Dimension`
named by its config field (a name the config does not have fails at import), and a trial's
settings sampled from it in order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from .. import config


@dataclass(frozen=True)
class Dimension:
    """One config field searched: integers or floats in [low, high] (log-scaled if `log`), or one of `choices`."""

    key: str  # the config field
    low: int | float = 0
    high: int | float = 0
    log: bool = False
    choices: tuple[Any, ...] = ()
    needs: tuple[str, int] | None = None  # (key, n): searched only where that setting exceeds n (else the config refuses it)

    def __post_init__(self) -> None:
        config.section_of(self.key)  # a ConfigError for a field the config does not have
        if self.needs is not None:
            config.section_of(self.needs[0])

    def applies(self, value_of: Callable[[str], Any]) -> bool:
        return self.needs is None or value_of(self.needs[0]) > self.needs[1]

    def sample(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


SPACE = (
    Dimension("hidden", 64, 1024, log=True),
    Dimension("layers", 1, 3),
    Dimension("embedding", 16, 256, log=True),
    Dimension("lr", 3e-4, 3e-2, log=True),
    Dimension("optimizer", choices=("adam", "adamw")),
    Dimension("weight_decay", choices=(0.0, 0.01, 0.1)),  # adam: L2; adamw: decoupled
    Dimension("schedule", choices=("constant", "cosine")),
    Dimension("warmup_steps", 0, 300),
    Dimension("batch_size", 16, 128, log=True),
    Dimension("num_steps", 32, 256, log=True),
    Dimension("reset_every", choices=(0, 10, 20, 50)),  # batches between a row's fresh states; 0: never
    Dimension("dropout", 0.0, 0.5),
    # AWD-LSTM's regularization
    Dimension("weight_drop", 0.0, 0.5),  # DropConnect on W_h
    Dimension("locked_dropout", choices=(False, True)),  # one mask a sequence for the three below
    Dimension("dropout_input", 0.0, 0.5, needs=("embedding", 0)),
    Dimension("dropout_hidden", 0.0, 0.5, needs=("layers", 1)),
    Dimension("dropout_output", 0.0, 0.5),
    Dimension("embedding_dropout", 0.0, 0.3, needs=("embedding", 0)),
    Dimension("ar", 0.0, 3.0),  # activation regularization α
    Dimension("tar", 0.0, 2.0),  # temporal activation regularization β
)


def search_space(fixed: dict[str, Any]) -> tuple[Dimension, ...]:
    """The dimensions of SPACE less those the options fix."""
    return tuple(d for d in SPACE if d.key not in fixed)


def sample(space: tuple[Dimension, ...], base: config.Config, trial: optuna.Trial) -> dict[str, Any]:
    """A trial's settings, in the space's order, so a dimension that needs another (dropout
    between layers needs layers > 1) sees its value: sampled, or the base config's."""
    params: dict[str, Any] = {}
    for d in space:
        if d.applies(lambda key: params[key] if key in params else base.value(key)):
            params[d.key] = d.sample(trial)
    return params
