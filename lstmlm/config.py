"""Every hyperparameter in one frozen config: overridden from the CLI, validated (read from a
TOML file or a stored JSON one by `config_file`).

A config file has three tables, `[data]`, `[model]` and `[train]`; every key in them is a
field of the matching dataclass below. Field names are unique across the three, so a
command-line override names a field alone (`hidden=512`) and `with_overrides` finds its table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args, get_type_hints

from . import cadences, cells
from .cadences import Cadence
from .errors import ConfigError
from .splits import parse_split

Normalize = Literal["d2l", "raw", "bytes", "auto"]
BatchOrder = Literal["sequential", "random"]  # the batch iterator (not collections.abc.Iterator)
Core = Literal["scratch", "cudnn"]
if TYPE_CHECKING:
    CellName = str
    GruForm = str
else:  # the registered cells' names, declared once (lstmlm/cells/__init__.py)
    CellName = Literal[cells.NAMES]
    GruForm = Literal[cells.GRU_FORMS]
RecurrencePath = Literal["auto", "loop", "fused", "compiled", "graph"]
Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["constant", "step", "cosine"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "auto"]
RecipeUse = Literal["auto", "on", "off"]


def setting(default: Any, help: str) -> Any:
    """A config field with the help text its command-line option shows (`lstmlm train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    corpus: str = setting("timemachine", "A known corpus name, a text file, a directory, or a glob ('src/**/*.[ch]').")
    normalize: Normalize = setting(
        "auto",
        "d2l (the seed's letters-only text), raw (every character), bytes (every byte: 256 symbols) or auto (d2l for timemachine, bytes for enwik8, else raw).",
    )
    max_tokens: int = setting(-1, "Train on the first N tokens (0 = all; -1 = 10,000 in d2l mode, as the seed, else all).")
    val_fraction: float = setting(-1.0, "The last fraction of the text, held out for validation (-1 = 0 in d2l mode, else 0.1).")
    split: str = setting("", "Train, validation and (optionally) test sizes from the start: '90M,5M,5M' (tokens; k, M, G) or '0.9,0.05,0.05'.")
    batch_size: int = setting(32, "Sequences per batch.")
    num_steps: int = setting(35, "Characters per sequence (backprop through time).")
    iterator: BatchOrder = setting("sequential", "sequential (state carried between batches) or random.")
    reset_every: int = setting(
        0,
        "Sequential iterator: zero each row's carried state once every N batches, the rows staggered (0 = never, the seed's way). "
        "A model that only ever continues a state can be lost from a zero one, where generation and validation start.",
    )
    strict: bool = setting(False, "In a directory or glob, refuse an empty or unreadable file instead of skipping it.")


@dataclass(frozen=True)
class ModelConfig:
    model: Core = setting("scratch", "scratch (the cell's equations, from the article) or cudnn (torch's fused layer: cuDNN on a GPU, oneDNN on a CPU).")
    cell: CellName = setting(cells.DEFAULT, f"The recurrent cell: {', '.join(cells.NAMES)}.")
    gru_form: GruForm = setting(
        "cudnn",
        "Where the GRU's reset gate sits: cudnn (R ⊙ (H W_hh + b_hh), as nn.GRU and cuDNN) or d2l (the book's (R ⊙ H) W_hh; scratch core only).",
    )
    hidden: int = setting(256, "Hidden units per layer.")
    layers: int = setting(1, "Stacked recurrent layers.")
    dropout: float = setting(0.0, "Dropout on the non-recurrent connections (embedding, between layers, before the output layer).")
    embedding: int = setting(0, "Learned embedding size (0 = the seed's one-hot input).")
    dropout_input: float = setting(-1.0, "Dropout on the embedding's output (-1 = dropout's rate; needs an embedding). AWD-LSTM's dropouti.")
    dropout_hidden: float = setting(-1.0, "Dropout between layers (-1 = dropout's rate; needs 2 layers or more). AWD-LSTM's dropouth.")
    dropout_output: float = setting(-1.0, "Dropout on the top layer's output, before the output layer (-1 = dropout's rate). AWD-LSTM's dropout.")
    locked_dropout: bool = setting(False, "Those dropouts with one mask per sequence, shared by every time step (variational, Gal & Ghahramani 2016).")
    weight_drop: float = setting(0.0, "DropConnect on the recurrent weights W_h: one mask per batch (Wan et al. 2013; AWD-LSTM's wdrop).")
    embedding_dropout: float = setting(0.0, "Drop whole rows of the embedding matrix (whole characters) per batch (needs an embedding). AWD-LSTM's dropoute.")


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
    precision: Precision = setting("auto", "fp32, bf16 or auto (the faster of the two on this model, timed before the run starts; fp32 in d2l mode).")
    path: RecurrencePath = setting(
        "auto",
        "How the scratch core runs its recurrence: loop (the readable equations), fused (the LSTM's Python fast path), "
        "compiled (the cell's kernel in C++, on a CPU), graph (the fused step as a CUDA graph) or auto (the fastest here).",
    )
    tf32: bool = setting(False, "On a CUDA GPU, let fp32 products use TF32 (faster; about 1e-3 relative error, so the two cores then differ that much).")
    sample_every: Cadence = setting(
        Cadence(minutes=10.0),
        "Greedy samples every N steps ('2000'), minutes ('10m') or epochs ('1e'); '1e,10m': whichever first; 0 = at the end.",
    )
    eval_every: Cadence = setting(
        Cadence(minutes=10.0, epochs=1),
        "Validation every N steps, minutes ('10m') or epochs ('1e'), or whichever first ('1e,10m'); 0 = at the end.",
    )
    checkpoint_every: Cadence = setting(
        Cadence(minutes=10.0),
        "Checkpoints every N steps, minutes ('10m') or epochs ('1e'), or whichever first; 0 = at the end.",
    )
    val_tokens: int = setting(250_000, "Validate during training on this many tokens of the validation text, a fixed sample (0 = all of it).")
    patience: int = setting(0, "Stop after N validations without improvement (0 = never).")
    max_minutes: float = setting(0.0, "Stop (validated, sampled, saved) after this much training; a cosine schedule anneals by the clock too.")
    recipe: RecipeUse = setting(
        "auto",
        "The default recipe: the model and its training chosen for the corpus, this machine's speed and max_minutes. auto: for a new "
        "run with max_minutes on text other than d2l's, without a config file; on: with one too (its keys and the options override "
        "the recipe's); off: never.",
    )
    ar: float = setting(0.0, "Activation regularization α: α·mean(H²) of the top layer's dropped outputs, added to the training loss (Merity et al. 2017).")
    tar: float = setting(0.0, "Temporal activation regularization β: β·mean((H_t − H_{t−1})²) of the top layer's outputs, added to the training loss.")
    tensorboard: str = setting(
        "",
        "Also log to TensorBoard, under DIR/RUN ('tensorboard --logdir DIR' compares the runs, tune's trials among them); '' = off. "
        "Needs: pip install 'lstmlm[tensorboard]'.",
    )


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved(self) -> Config:
        """The config with every "auto" data field replaced by its value for the corpus and mode.

        The d2l corpus (`timemachine`) keeps the seed: d2l text, its first 10,000 tokens, no
        validation. Any other corpus (a path, a glob, another known name) is read raw, whole,
        with the last 10% held out; a known corpus may bring its own mode and standard split
        (enwik8: bytes, 90M,5M,5M). A path (or glob) is made absolute, from the working directory
        it is given in: the run reads its corpus again (`evaluate --part val`, `--resume`) from
        wherever it is asked to."""
        from .data.download import KNOWN  # no torch, no network: only the table of known corpora

        d = self.data
        if d.corpus and d.corpus not in KNOWN:
            d = dataclasses.replace(d, corpus=str(Path(os.path.expanduser(d.corpus)).absolute()))
        known = KNOWN.get(d.corpus)
        normalize = cast(Normalize, d.normalize if d.normalize != "auto" else known.normalize if known else "raw")
        d2l = normalize == "d2l"
        split = d.split
        if not split and d.val_fraction == -1.0 and known is not None:
            split = known.split
        max_tokens = (10_000 if d2l else 0) if d.max_tokens == -1 else d.max_tokens
        val_fraction = (0.0 if d2l or split else 0.1) if d.val_fraction == -1.0 else d.val_fraction
        data = dataclasses.replace(d, normalize=normalize, max_tokens=max_tokens, val_fraction=val_fraction, split=split)
        return dataclasses.replace(self, data=data)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data, table by table: a cadence in its canonical written form ("1e,10m")."""
        return {name: {f.name: _plain(getattr(table, f.name)) for f in fields(table)} for name, table in self.tables()}

    def tables(self) -> list[tuple[str, Any]]:
        return [("data", self.data), ("model", self.model), ("train", self.train)]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self, header: str = "") -> str:
        """The config as a TOML file that `load` reads back to this same config; `header`, if
        given, opens it as comment lines."""
        lines = [f"# {line}".rstrip() for line in header.splitlines()]
        for table, values in self.to_dict().items():
            lines += ["", f"[{table}]"] if lines else [f"[{table}]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        return "\n".join(lines) + "\n"

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A copy with the given fields replaced (None values are ignored); validates the result."""
        tables: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in overrides.items():
            if value is None:
                continue
            tables[section_of(key)][key] = value
        return from_dict({name: {**vars(getattr(self, name)), **tables[name]} for name in SECTIONS})

    def value(self, key: str) -> Any:
        """A field's value by its name alone (names are unique across the tables)."""
        return getattr(getattr(self, section_of(key)), key)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Cadence) else value


def _toml_value(value: Any) -> str:
    """A field's value in TOML: true/false, Python's repr of a number (TOML's syntax for every
    finite one), a string in JSON's escapes, which TOML's basic strings share (DEL, which JSON
    leaves as it is and TOML refuses, escaped too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}

# Fields that change the model's function or its parameters' shapes: a checkpoint must agree on them.
# (Dropout of every kind, DropConnect, AR and TAR act in training only: not among them.)
MODEL_DEFINING = ("normalize", "model", "cell", "gru_form", "hidden", "layers", "embedding")

# Fields a resumed run may change: they alter neither the model nor the data. (The regularization
# alters the training itself, so a resume keeps it, as it keeps lr: it stays exact.)
RESUMABLE = frozenset(
    {"epochs", "device", "precision", "recipe", "tf32", "path", "sample_every", "eval_every", "checkpoint_every", "patience", "max_minutes"}
    | {"val_tokens", "strict"}
    | {"tensorboard"}  # where the logs go
)

CADENCES = cadences.KEYS  # typed Cadence values (cadences.py), parsed once


@dataclass(frozen=True)
class FieldInfo:
    name: str
    table: str
    type: Any  # the resolved annotation: int, float, str or a Literal of the choices
    help: str


def all_fields() -> list[FieldInfo]:
    """Every config field, table by table, in declaration order: what `lstmlm train` offers as options."""
    return [FieldInfo(f.name, table, hints(cls)[f.name], f.metadata.get("help", "")) for table, cls in SECTIONS.items() for f in fields(cls)]


def field_names() -> list[str]:
    """Every config field's name, table by table, in declaration order."""
    return [f.name for cls in SECTIONS.values() for f in fields(cls)]


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """A table's fields and their resolved types, worked out once (`lstmlm runs` reads hundreds
    of configs, and resolving the annotations costs more than checking the values)."""
    return get_type_hints(cls)


def section_of(key: str) -> str:
    """The table ("data", "model" or "train") that holds the field `key`."""
    for name, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return name
    raise ConfigError(f"unknown config key '{key}'")


_KIND = {int: "an int", float: "a float", str: "a string"}  # each type with its article, for messages
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: torch's optimizers refuse a larger lr or decay, mid-step


def kind(hint: Any) -> str:
    """A type as a message names it: "an int", "a float", "a string"."""
    return _KIND.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _coerce(table: str, key: str, value: Any, hint: Any) -> Any:
    """Check one value against its field's type; ints are accepted where floats are expected."""
    where = f"[{table}] {key}"
    if key in CADENCES:  # an integer (steps), a string, or a Cadence already parsed
        return value if isinstance(value, Cadence) else Cadence.parse(value, where)
    choices = get_args(hint)
    if choices:  # a Literal
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if hint is bool or isinstance(value, bool):
        if hint is bool and isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be {'true or false' if hint is bool else kind(hint)}, not {value!r}")
    if hint is float and isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float (JSON has no limit)
            raise ConfigError(f"{where} must be a finite number, and this integer is too large") from None
    if not isinstance(value, hint):
        raise ConfigError(f"{where} must be {kind(hint)}, not {value!r}")
    if hint is int and not -(2**63) <= value < 2**63:  # torch's sizes are 64-bit
        raise ConfigError(f"{where} is too large")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    return value


def _place_rates(m: ModelConfig) -> list[tuple[str, float]]:
    """The dropout rates of the three places, by name."""
    return [("dropout_input", m.dropout_input), ("dropout_hidden", m.dropout_hidden), ("dropout_output", m.dropout_output)]


def _validate(cfg: Config) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    rules = [
        (d.batch_size >= 1, "[data] batch_size must be at least 1"),
        (d.num_steps >= 1, "[data] num_steps must be at least 1"),
        (d.reset_every >= 0, "[data] reset_every must be 0 (never) or a number of batches"),
        (d.max_tokens >= -1, "[data] max_tokens must be -1 (auto), 0 (all) or positive"),
        (0.0 <= d.val_fraction < 1.0 or d.val_fraction == -1.0, "[data] val_fraction must be in [0, 1)"),
        (bool(d.corpus), "[data] corpus must not be empty"),
        (m.hidden >= 1, "[model] hidden must be at least 1"),
        (m.layers >= 1, "[model] layers must be at least 1"),
        (0.0 <= m.dropout < 1.0, "[model] dropout must be in [0, 1)"),
        (m.embedding >= 0, "[model] embedding must be 0 (one-hot) or positive"),
        *((0.0 <= r < 1.0 or r == -1.0, f"[model] {k} must be in [0, 1), or -1 for dropout's rate") for k, r in _place_rates(m)),
        (0.0 <= m.weight_drop < 1.0, "[model] weight_drop must be in [0, 1)"),
        (0.0 <= m.embedding_dropout < 1.0, "[model] embedding_dropout must be in [0, 1)"),
        (m.embedding_dropout == 0 or m.embedding > 0, "[model] embedding_dropout drops rows of the embedding matrix: it needs embedding > 0"),
        (m.dropout_input <= 0 or m.embedding > 0, "[model] dropout_input acts on the embedding's output: it needs embedding > 0"),
        (m.dropout_hidden <= 0 or m.layers > 1, "[model] dropout_hidden acts between layers: it needs layers > 1"),
        (m.cell == "gru" or m.gru_form == "cudnn", '[model] gru_form applies to the GRU only (cell = "gru")'),
        (m.gru_form == "cudnn" or m.model == "scratch", '[model] gru_form d2l (the book\'s GRU) has no torch module: it needs model = "scratch"'),
        (t.epochs >= 1, "[train] epochs must be at least 1"),
        (t.recipe != "on" or t.max_minutes > 0, '[train] recipe = "on" chooses for a time budget: it needs max_minutes > 0'),
        (t.lr > 0.0, "[train] lr must be positive"),
        (t.weight_decay >= 0.0, "[train] weight_decay must not be negative"),
        *((getattr(t, k) <= FLOAT32_MAX, f"[train] {k} must be at most {FLOAT32_MAX:.4g}, float32's largest (the weights')") for k in ("lr", "weight_decay")),
        (t.clip >= 0.0, "[train] clip must not be negative (0 turns clipping off)"),
        (t.warmup_steps >= 0, "[train] warmup_steps must not be negative"),
        (t.step_every >= 0, "[train] step_every must not be negative"),
        (0.0 < t.gamma <= 1.0, "[train] gamma must be in (0, 1]"),
        (t.val_tokens >= 0, "[train] val_tokens must be 0 (all) or positive"),
        (t.patience >= 0, "[train] patience must not be negative"),
        (t.max_minutes >= 0.0, "[train] max_minutes must not be negative"),
        *((v >= 0.0, f"[train] {k} must not be negative") for k, v in (("ar", t.ar), ("tar", t.tar))),
        (t.schedule != "step" or t.step_every >= 1, "[train] schedule 'step' needs step_every >= 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    if d.split:
        parse_split(d.split)
        if d.val_fraction not in (-1.0, 0.0):
            raise ConfigError("give the validation text with either [data] split or [data] val_fraction, not both")


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
        types = hints(cls)
        for key in values:
            if key not in types:
                raise ConfigError(f"unknown config key '{key}' in [{table}]")
        parts[table] = cls(**{k: _coerce(table, k, v, types[k]) for k, v in values.items()})
    cfg = Config(**parts)
    _validate(cfg)
    return cfg
