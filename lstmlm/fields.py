"""A dataclass field that carries what an interface needs to offer it — its help text, its bounds,
its command-line flag — so that the dataclass is the one declaration of a set of options
(`sampling.Sampling` for generate and the HTTP API, `serve.Limits` for serve). No torch."""

from __future__ import annotations

from dataclasses import Field, field
from typing import Any


def option(default: Any, help: str, low: float | None = None, high: float | None = None, flag: str = "", shown_default: str = "") -> Any:
    """A field with its `help`, its bounds (`low`, `high`, inclusive), the command line's `flag`
    where it is not the name's, and what `--help` shows as its default where that is not the value."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "flag": flag, "shown_default": shown_default})


def flag_of(f: Field[Any]) -> str:
    """`--top-p` for top_p, unless the field names its own."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
