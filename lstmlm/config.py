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


def setting(default: Any, help: str) -> Any:
    """A config field with the help text its command-line option shows (`lstmlm train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    corpus: str = setting("timemachine", "A known corpus name, a text file or a directory of text files.")
    normalize: Normalize = setting("d2l", "d2l (the seed's letters-only text) or raw (every character).")
    max_tokens: int = setting(-1, "Train on the first N tokens (0 = all; -1 = 10,000 in d2l mode, as the seed, else all).")
    val_fraction: float = setting(-1.0, "The last fraction of the text, held out for validation (-1 = 0 in d2l mode, else 0.1).")
    batch_size: int = setting(32, "Sequences per batch.")
    num_steps: int = setting(35, "Characters per sequence (backprop through time).")
    iterator: Iterator = setting("sequential", "sequential (state carried between batches) or random.")


@dataclass(frozen=True)
class ModelConfig:
    model: Core = setting("scratch", "scratch (the article's LSTM) or cudnn (nn.LSTM).")
    hidden: int = setting(256, "Hidden units per layer.")
    layers: int = setting(1, "Stacked LSTM layers.")
    dropout: float = setting(0.0, "Dropout on the non-recurrent connections (embedding, between layers, before the output layer).")
    embedding: int = setting(0, "Learned embedding size (0 = the seed's one-hot input).")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(500, "Passes over the training text.")
    lr: float = setting(1.0, "Learning rate.")
    optimizer: Optimizer = setting("sgd", "sgd, adam or adamw.")
    weight_decay: float = setting(0.0, "Weight decay (L2 for sgd and adam, decoupled for adamw).")
    clip: float = setting(1.0, "Global gradient-norm clipping threshold θ (0 = off).")
    schedule: Schedule = setting("constant", "Learning-rate schedule: constant, step or cosine.")
    warmup_steps: int = setting(0, "Optimizer steps of linear learning-rate warm-up.")
    step_every: int = setting(0, "Epochs between decays of the step schedule.")
    gamma: float = setting(0.1, "Factor of each step-schedule decay.")
    seed: int = setting(0, "Seed of the initialization, the data order and dropout.")
    device: DeviceName = setting("auto", "auto, cpu, cuda or mps.")
    precision: Precision = setting("fp32", "fp32, bf16 or auto (bf16 where the hardware multiplies it natively).")
    tf32: bool = setting(False, "On a CUDA GPU, let fp32 products use TF32 (faster; about 1e-3 relative error, so the two cores then differ that much).")
    sample_every: int = setting(0, "Epochs between greedy samples (0 = only at the end).")
    eval_every: int = setting(0, "Optimizer steps between validations (0 = once per epoch).")
    checkpoint_every: int = setting(10, "Epochs between checkpoints (and always at the end).")
    patience: int = setting(0, "Stop after N validations without improvement (0 = never).")
    max_minutes: float = setting(0.0, "Stop (validated, sampled, saved) after this much training; a cosine schedule anneals by the clock too.")


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
            tables[section_of(key)][key] = value
        return from_dict({name: {**getattr(self, name).__dict__, **tables[name]} for name in SECTIONS})

    def value(self, key: str) -> Any:
        """A field's value by its name alone (names are unique across the tables)."""
        return getattr(getattr(self, section_of(key)), key)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# Fields that change the model's function or its parameters' shapes: a checkpoint must agree on them.
MODEL_DEFINING = ("normalize", "model", "hidden", "layers", "embedding")

# Fields a resumed run may change: they alter neither the model nor the data.
RESUMABLE = frozenset(
    {"epochs", "device", "precision", "tf32", "sample_every", "eval_every", "checkpoint_every", "patience", "max_minutes"}
)


@dataclass(frozen=True)
class FieldInfo:
    name: str
    table: str
    type: Any  # the resolved annotation: int, float, str or a Literal of the choices
    help: str


def all_fields() -> list[FieldInfo]:
    """Every config field, table by table, in declaration order: what `lstmlm train` offers as options."""
    return [
        FieldInfo(f.name, table, get_type_hints(cls)[f.name], f.metadata.get("help", ""))
        for table, cls in SECTIONS.items()
        for f in fields(cls)
    ]


def section_of(key: str) -> str:
    """The table ("data", "model" or "train") that holds the field `key`."""
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
    if hint is bool or isinstance(value, bool):  # a bool is an int in Python: never let one pass for the other
        if hint is bool and isinstance(value, bool):
            return value
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
