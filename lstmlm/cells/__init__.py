"""The recurrent cells lstmlm trains: one module each, named here once.

A cell (`base.Cell`) is one object that gives its equations as one readable `step` (the book's
names), its scratch module's parameters, the torch module that computes the same function and
exact conversions between the two, the names of its state, its gates with their ranges, its
parameter and FLOP counts, and optionally its compiled elementwise part. Everything outside
this package treats the state as an opaque tuple of tensors and asks the cell.

This module imports no torch: the config and the command line read the names from here.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING, NamedTuple

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import Cell


class Entry(NamedTuple):
    """A cell as the registry knows it before its module is imported: where its class is, and
    its shape, so that a model's size is counted without torch (`lstmlm runs`, `sizes.py`)."""

    where: str  # "module:Class", imported when first asked for
    blocks: int  # the blocks of H columns in W_x, W_h and b: its gates and candidate
    recurrent_bias: tuple[str, ...] = ()  # the forms with a bias inside the recurrence (nn.GRU's b_hn)
    forms: tuple[str, ...] = ("cudnn",)  # its variants, the standard first (the GRU's: where its reset gate sits)


REGISTRY: dict[str, Entry] = {
    "lstm": Entry("lstmlm.cells.lstm:LSTM", blocks=4),
    "gru": Entry("lstmlm.cells.gru:GRU", blocks=3, recurrent_bias=("cudnn",), forms=("cudnn", "d2l")),
    "rnn": Entry("lstmlm.cells.rnn:RNN", blocks=1),
}

NAMES = tuple(REGISTRY)
DEFAULT = "lstm"
STANDARD_FORM = "cudnn"  # a cell's form unless asked otherwise: torch's own equations
GRU_FORMS = REGISTRY["gru"].forms


def title(name: str, form: str | None = STANDARD_FORM) -> str:
    """The cell as a listing names it: 'gru (d2l)' for the book's GRU, else the name alone."""
    return name if form in (None, STANDARD_FORM) else f"{name} ({form})"


@cache
def get(name: str, form: str = STANDARD_FORM) -> Cell:
    """The cell called `name`; `form` chooses between a cell's variants where it has two (the
    GRU's: "cudnn", the reset gate inside the recurrent product's term as nn.GRU and cuDNN
    apply it, or "d2l", the book's, before the product)."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown cell '{name}' (choose from {', '.join(NAMES)})")
    module, _, cls = REGISTRY[name].where.partition(":")
    return getattr(importlib.import_module(module), cls).variant(form)  # type: ignore[no-any-return]


def every() -> list[Cell]:
    """Every registered cell, in its standard form."""
    return [get(name) for name in NAMES]


def num_parameters(name: str, form: str, inputs: int, hiddens: int, core: str) -> int:
    """A layer's parameters, from the registry alone: W_x, W_h and the bias b of blocks·H columns;
    torch's module keeps two bias vectors, the scratch core one (and b_hh where the form has it)."""
    entry = REGISTRY[name]
    G = entry.blocks * hiddens
    biases = 2 * G if core == "cudnn" else G + (hiddens if form in entry.recurrent_bias else 0)
    return G * (inputs + hiddens) + biases
