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


# What a field declared with each of these types takes (an int where a float is asked for; never a
# bool, which Python counts an int), and its name in a message.
KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an int"),
    "int | None": ((int, type(None)), "an int"),
    "float": ((int, float), "a float"),
    "float | None": ((int, float, type(None)), "a float"),
}


def wrong_type(f: Field[Any], value: Any) -> str | None:
    """What `value` should have been ("an int") where it does not fit `f`'s declared type (one
    of KINDS; a field of another type is not checked here), else None."""
    kinds = KINDS.get(str(f.type))
    if kinds is None or (isinstance(value, kinds[0]) and not isinstance(value, bool)):
        return None
    return kinds[1]


def flag_of(f: Field[Any]) -> str:
    """`--top-p` for top_p, unless the field names its own."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
