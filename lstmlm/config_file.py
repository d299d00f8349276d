"""A config read from a file: a TOML config (`configs/*.toml`), or a run's stored JSON, whose
older formats are brought up to date (`upgrade`). Every problem is a ConfigError naming it.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from .config import Config, from_dict
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; a file this large is something else


def load(path: str | Path) -> Config:
    """Read a TOML config file; every problem is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = _read_text(path)
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


def written_keys(path: str | Path) -> frozenset[str]:
    """The fields a config file writes (the others take their defaults); `load` has read it."""
    raw = tomllib.loads(_read_text(Path(path)))
    return frozenset(key for table in raw.values() if isinstance(table, dict) for key in table)


def _read_text(path: Path) -> str:
    """A config file's text. A byte-order mark (Windows' Notepad saves one) is dropped: TOML
    forbids it, and its error, "Invalid statement at line 1, column 1", would not say why."""
    return _read_config(path).decode("utf-8-sig")


def _read_config(path: Path) -> bytes:
    """A config file's bytes: a regular file of at most MAX_CONFIG_BYTES. A FIFO would block,
    and a device such as /dev/zero read until memory runs out; neither is read at all."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: opening a FIFO waits for no writer
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"config file {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config")
    return data


def from_json(text: str) -> Config:
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer of > 4300 digits; deep nesting
        raise ConfigError(f"stored config is not valid JSON: {_reason(e)}") from None
    return from_dict(upgrade(raw))


def upgrade(raw: Any) -> Any:
    """A stored config of an older format in today's terms (one step a format, in order; the
    checkpoint's chain, `checkpoint.migrate`, takes this as its first):

    - before cadences (no val_tokens): checkpoints and samples were counted in epochs and
      validations in steps (0: every epoch);
    - before cells (no `cell`): every model was an LSTM."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and "val_tokens" not in train:
        train = dict(train)
        for key in ("checkpoint_every", "sample_every"):
            if isinstance(train.get(key), int) and not isinstance(train[key], bool):
                train[key] = f"{train[key]}e" if train[key] > 0 else "0"
        if train.get("eval_every") == 0:
            train["eval_every"] = "1e"
        raw = {**raw, "train": train}
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and "cell" not in model:
        raw = {**raw, "model": {**model, "cell": "lstm"}}
    return raw


def _reason(e: Exception) -> str:
    """A parser's complaint in a few words (Python's recursion and digit-limit messages are long)."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0] if "integer string conversion" in str(e) else str(e)
