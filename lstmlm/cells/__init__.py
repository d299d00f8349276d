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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Cell

# name → the module and class of the cell (imported when first asked for)
REGISTRY: dict[str, str] = {
    "lstm": "lstmlm.cells.lstm:LSTM",
    "gru": "lstmlm.cells.gru:GRU",
    "rnn": "lstmlm.cells.rnn:RNN",
}

NAMES = tuple(REGISTRY)
DEFAULT = "lstm"


@cache
def get(name: str, form: str = "cudnn") -> Cell:
    """The cell called `name`; `form` chooses between a cell's variants where it has two (the
    GRU's: "cudnn", the reset gate inside the recurrent product's term as nn.GRU and cuDNN
    apply it, or "d2l", the book's, before the product)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown cell '{name}' (choose from {', '.join(NAMES)})")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls).variant(form)  # type: ignore[no-any-return]


def every() -> list[Cell]:
    """Every registered cell, in its standard form."""
    return [get(name) for name in NAMES]
