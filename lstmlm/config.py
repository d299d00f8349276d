"""Every hyperparameter in one frozen config: loaded from TOML, overridden from the CLI, validated.

A config file has three tables, `[data]`, `[model]` and `[train]`; every key in them is a
field of the matching dataclass below. Field names are unique across the three, so a
command-line override names a field alone (`hidden=512`) and `with_overrides` finds its table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

Normalize = Literal["d2l", "raw"]
Iterator = Literal["sequential", "random"]
Core = Literal["scratch", "cudnn"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "step", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "auto"]


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "timemachine"  # a known corpus name, a local file or a directory of text files
    normalize: Normalize = "d2l"
    max_tokens: int = -1  # 0 = the whole corpus; -1 = auto: 10,000 in d2l mode (the seed), all in raw
    val_fraction: float = -1.0  # the last fraction, never trained on; -1 = auto: 0 in d2l, 0.1 in raw
    batch_size: int = 32
    num_steps: int = 35
    iterator: Iterator = "sequential"


@dataclass(frozen=True)
class ModelConfig:
    model: Core = "scratch"
    hidden: int = 256
    layers: int = 1
    dropout: float = 0.0  # on the non-recurrent connections: embedding output, between layers, before the output layer
    embedding: int = 0  # 0 = the seed's one-hot input; > 0 = a learned embedding of this size


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 500
    lr: float = 1.0
    optimizer: Optimizer = "sgd"
    weight_decay: float = 0.0
    clip: float = 1.0  # global gradient-norm threshold θ; 0 = no clipping
    schedule: Schedule = "constant"
    warmup_steps: int = 0
    step_every: int = 0  # epochs between step decays ("step" schedule)
    gamma: float = 0.1  # factor of each step decay
    seed: int = 0
    device: DeviceName = "auto"
    precision: Precision = "fp32"
    sample_every: int = 0  # epochs between greedy samples; 0 = only at the end
    eval_every: int = 0  # optimizer steps between validations; 0 = once per epoch
    checkpoint_every: int = 10  # epochs between checkpoints (and always at the end)
    patience: int = 0  # validations without improvement before stopping; 0 = never stop early
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much training; 0 = no limit. A cosine schedule then anneals by the time too


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved(self) -> Config:
        """The config with every "auto" (-1) data field replaced by its value for the chosen mode."""
        d = self.data
        d2l = d.normalize == "d2l"
        max_tokens = (10_000 if d2l else 0) if d.max_tokens == -1 else d.max_tokens
        val_fraction = (0.0 if d2l else 0.1) if d.val_fraction == -1.0 else d.val_fraction
        return dataclasses.replace(
            self, data=dataclasses.replace(d, max_tokens=max_tokens, val_fraction=val_fraction)
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with the given fields replaced (None values are ignored); validates the result."""
        tables: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in overrides.items():
            if value is None:
                continue
            tables[_section_of(key)][key] = value
        return from_dict({name: {**getattr(self, name).__dict__, **tables[name]} for name in SECTIONS})


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# Fields that change the model's function or its parameters' shapes: a resumed run may not change them.
MODEL_DEFINING = ("normalize", "model", "hidden", "layers", "embedding")


def _section_of(key: str) -> str:
    for name, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return name
    raise ConfigError(f"unknown config key '{key}'")


def _coerce(table: str, key: str, value: Any, hint: Any) -> Any:
    """Check one value against its field's type; ints are accepted where floats are expected."""
    where = f"[{table}] {key}"
    choices = get_args(hint)
    if choices:  # a Literal
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if hint is bool or isinstance(value, bool):
        raise ConfigError(f"{where} must be a {hint.__name__}, not {value!r}")
    if hint is float and isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float (JSON has no limit)
            raise ConfigError(f"{where} must be a finite number, and this integer is too large") from None
    if not isinstance(value, hint):
        raise ConfigError(f"{where} must be a {hint.__name__}, not {value!r}")
    if hint is int and not -(2**63) <= value < 2**63:  # torch's sizes are 64-bit
        raise ConfigError(f"{where} is too large")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    return value


def _validate(cfg: Config) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    rules = [
        (d.batch_size >= 1, "[data] batch_size must be at least 1"),
        (d.num_steps >= 1, "[data] num_steps must be at least 1"),
        (d.max_tokens >= -1, "[data] max_tokens must be -1 (auto), 0 (all) or positive"),
        (0.0 <= d.val_fraction < 1.0 or d.val_fraction == -1.0, "[data] val_fraction must be in [0, 1)"),
        (bool(d.corpus), "[data] corpus must not be empty"),
        (m.hidden >= 1, "[model] hidden must be at least 1"),
        (m.layers >= 1, "[model] layers must be at least 1"),
        (0.0 <= m.dropout < 1.0, "[model] dropout must be in [0, 1)"),
        (m.embedding >= 0, "[model] embedding must be 0 (one-hot) or positive"),
        (t.epochs >= 1, "[train] epochs must be at least 1"),
        (t.lr > 0.0, "[train] lr must be positive"),
        (t.weight_decay >= 0.0, "[train] weight_decay must not be negative"),
        (t.clip >= 0.0, "[train] clip must not be negative (0 turns clipping off)"),
        (t.warmup_steps >= 0, "[train] warmup_steps must not be negative"),
        (t.step_every >= 0, "[train] step_every must not be negative"),
        (0.0 < t.gamma <= 1.0, "[train] gamma must be in (0, 1]"),
        (t.sample_every >= 0, "[train] sample_every must not be negative"),
        (t.eval_every >= 0, "[train] eval_every must not be negative"),
        (t.checkpoint_every >= 1, "[train] checkpoint_every must be at least 1"),
        (t.patience >= 0, "[train] patience must not be negative"),
        (t.max_minutes >= 0.0, "[train] max_minutes must not be negative"),
        (t.schedule != "step" or t.step_every >= 1, "[train] schedule 'step' needs step_every >= 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def from_dict(raw: Any) -> Config:
    """Build and validate a Config from nested tables; unknown tables or keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("a config must be a table of [data], [model] and [train]")
    for table in raw:
        if table not in SECTIONS:
            raise ConfigError(f"unknown config table [{table}] (expected data, model, train)")
    parts = {}
    for table, cls in SECTIONS.items():
        values = raw.get(table, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{table}] must be a table")
        hints = get_type_hints(cls)
        for key in values:
            if key not in hints:
                raise ConfigError(f"unknown config key '{key}' in [{table}]")
        parts[table] = cls(**{k: _coerce(table, k, v, hints[k]) for k, v in values.items()})
    cfg = Config(**parts)
    _validate(cfg)
    return cfg


def load(path: str | Path) -> Config:
    """Read a TOML config file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as e:  # TOMLDecodeError; an integer of > 4300 digits; deep nesting
        raise ConfigError(f"{path} is not valid TOML: {_reason(e)}") from None
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_json(text: str) -> Config:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer of > 4300 digits; deep nesting
        raise ConfigError(f"stored config is not valid JSON: {_reason(e)}") from None
    return from_dict(raw)


def _reason(e: Exception) -> str:
    """A parser's complaint in a few words (Python's recursion and digit-limit messages are long)."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0] if "integer string conversion" in str(e) else str(e)
