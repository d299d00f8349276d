"""What a recurrent cell is to the rest of lstmlm: `Cell`, and what every cell shares.

A cell's parameters are stored packed, the way its products multiply them: per layer W_x
(inputs, blocks·hiddens), W_h (hiddens, blocks·hiddens) and b (blocks·hiddens), its blocks side
by side in torch's order (`Cell.blocks`: nn.LSTM's i, f, g = c̃, o; nn.GRU's r, z, n; nn.RNN's
one), weights stored (inputs, hiddens) so `X @ W` reads as the equations do. The article's
names — W_xi, W_hi, b_i, … — are views of them (`Cell.views`), so the readable step reads the
equations' names while an optimizer step updates three tensors. A cell with a second bias inside
its recurrence (nn.GRU's b_hn) keeps it as a fourth parameter, `b_hh`.

torch's modules hold the same numbers transposed — weight_ih = W_xᵀ, weight_hh = W_hᵀ — and
split the bias in two, bias_ih + bias_hh: `to_torch` and `from_torch` convert exactly.

The state is a tuple of tensors, (layers, batch, hiddens) each, named by `Cell.state` —
("H", "C") for the LSTM, ("H",) for the others. The first is always H, what the layer outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError

State = tuple[torch.Tensor, ...]  # the cell's state, each (layers, batch, hiddens); State[0] is H
TORCH_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a layer of torch's module: each suffixed _l{k}


@dataclass(frozen=True)
class Gate:
    """One quantity of a cell's step that `lstmlm inspect` and the page can show."""

    name: str  # what people choose on the command line: "input"
    symbol: str  # the equation's symbol, the field of the cell's Step: "I"
    low: float | None  # the range of its values (None: unbounded)
    high: float | None
    meaning: str  # "input gate"

    @property
    def saturates(self) -> bool:
        """A sigmoid gate, in (0, 1): it saturates closed near 0 and open near 1."""
        return (self.low, self.high) == (0.0, 1.0)

    @property
    def neutral(self) -> float:
        """The level a unit is furthest from when it says most: the middle of its range (0 unbounded)."""
        return 0.5 if self.saturates else 0.0


def sigmoid_gate(name: str, symbol: str, meaning: str) -> Gate:
    return Gate(name, symbol, 0.0, 1.0, meaning)


def tanh_gate(name: str, symbol: str, meaning: str) -> Gate:
    return Gate(name, symbol, -1.0, 1.0, meaning)


class Stacked(NamedTuple):
    """A layer's weights for the fast paths, transposed for the feature-major products; the
    products' operands in the compute dtype, the rest in the parameters'."""

    W_hT: torch.Tensor  # (blocks·hiddens, hiddens), contiguous, compute dtype
    W_xT: torch.Tensor | None  # (blocks·hiddens, inputs), compute dtype, for dense inputs; None for ids
    b: torch.Tensor  # (blocks·hiddens,)
    table: torch.Tensor | None  # (blocks·hiddens, inputs): (W_x + b)ᵀ, whose columns ids pick; None for dense
    b_h: torch.Tensor | None  # (blocks·hiddens,): the bias inside the recurrence (b_hh where its block is), or None


class Cell(ABC):
    """A recurrent cell. Subclasses set the class attributes and write `step`."""

    name: ClassVar[str]  # as the config and the command line name it: "lstm"
    title: ClassVar[str]  # as prose names it: "LSTM"
    torch_module: ClassVar[Callable[..., nn.RNNBase]]  # the torch layer that computes the same function (nn.LSTM, …)
    blocks: ClassVar[tuple[str, ...]]  # the packed blocks, in torch's order, by the letters of the article's names
    init_order: ClassVar[tuple[str, ...]]  # the order the seed's code draws the blocks' weights in
    state: ClassVar[tuple[str, ...]]  # the state's names; the first is H
    gates: ClassVar[tuple[Gate, ...]]  # every quantity a step makes, for inspect and the page
    default_gate: ClassVar[str]  # the one inspect shows unless told
    recurrent_bias: bool = False  # a bias inside the recurrence, b_hh (nn.GRU's b_hn)
    form: str = "cudnn"  # which of a cell's variants this is (the GRU has two)
    torch_equivalent: bool = True  # whether `torch_module` computes this form's function
    kernel: str | None = None  # C++ of the compiled elementwise part (csrc/recurrence.cpp's driver runs it), or None
    fused: Callable[..., tuple[torch.Tensor, State]] | None = None  # a Python fast path (layer, X, state, dtype, W_h), or None

    @classmethod
    def variant(cls, form: str) -> Cell:
        """The cell in `form`; a cell with one form has only "cudnn"."""
        if form != "cudnn":
            raise ConfigError(f"the {cls.title} has one form; '{form}' is the GRU's")
        return cls()

    @abstractmethod
    def step(self, XW: Mapping[str, torch.Tensor], state: State, p: Mapping[str, torch.Tensor]) -> NamedTuple:
        """One step of the equations, every quantity kept (a NamedTuple with a field per gate's
        symbol, and `state`). `XW[g]` is X_t W_x{g} already projected, `state` the previous
        step's, `p` the layer's parameters by the article's names."""

    def next_state(self, step: NamedTuple) -> State:
        """The state a step leaves, in `state`'s order."""
        return tuple(getattr(step, name) for name in self.state)

    # ---- the packed layout ----

    @property
    def width(self) -> int:
        """Blocks a layer's products make: 4 for the LSTM, 3 for the GRU, 1 for the RNN."""
        return len(self.blocks)

    def block(self, g: str, hiddens: int) -> slice:
        """The columns (or rows, transposed) of block `g` in a packed (…, blocks·hiddens) tensor."""
        k = self.blocks.index(g)
        return slice(k * hiddens, (k + 1) * hiddens)

    def parameter_names(self) -> tuple[str, ...]:
        """A layer's parameters by the article's names, block by block in the draw order."""
        names = tuple(f"{kind}{g}" for g in self.init_order for kind in ("W_x", "W_h", "b_"))
        return names + (("b_hh",) if self.recurrent_bias else ())

    def views(self, packed: Mapping[str, torch.Tensor], W_h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The article's parameters by name, as views of the packed ones (W_x, W_h, b[, b_hh]);
        with `W_h` (DropConnect's W_h ⊙ M) in the parameter's place when given."""
        sources = {"W_x": packed["W_x"], "W_h": packed["W_h"] if W_h is None else W_h, "b_": packed["b"]}
        hiddens = packed["W_h"].shape[0]
        views = {f"{kind}{g}": sources[kind][..., self.block(g, hiddens)] for g in self.blocks for kind in sources}
        if self.recurrent_bias:
            views["b_hh"] = packed["b_hh"]
        return views

    def packed_names(self) -> tuple[str, ...]:
        return ("W_x", "W_h", "b", "b_hh") if self.recurrent_bias else ("W_x", "W_h", "b")

    def pack(self, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The packed parameters from the article's, by name (the inverse of `views`)."""
        packed = {
            "W_x": torch.cat([named[f"W_x{g}"] for g in self.blocks], dim=1),
            "W_h": torch.cat([named[f"W_h{g}"] for g in self.blocks], dim=1),
            "b": torch.cat([named[f"b_{g}"] for g in self.blocks]),
        }
        if self.recurrent_bias:
            packed["b_hh"] = named["b_hh"]
        return packed

    # ---- torch's module ----

    def to_torch(self, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's packed parameters as torch's: weight_ih, weight_hh, bias_ih, bias_hh."""
        b = packed["b"]
        bias_hh = torch.zeros_like(b)
        if self.recurrent_bias:
            bias_hh[self.block(self.blocks[-1], b.shape[0] // self.width)] = packed["b_hh"]
        return {"weight_ih": packed["W_x"].T.contiguous(), "weight_hh": packed["W_h"].T.contiguous(), "bias_ih": b.clone(), "bias_hh": bias_hh}

    def from_torch(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torch's four parameters of a layer as the packed ones. The two biases add up where
        the cell sums them; a cell with b_hh keeps its block of bias_hh apart."""
        bias_ih, bias_hh = weights["bias_ih"], weights["bias_hh"]
        packed = {"W_x": weights["weight_ih"].T.contiguous(), "W_h": weights["weight_hh"].T.contiguous()}
        if not self.recurrent_bias:
            packed["b"] = bias_ih + bias_hh
            return packed
        inner = self.block(self.blocks[-1], bias_ih.shape[0] // self.width)
        summed = bias_hh.clone()
        summed[inner] = 0
        packed["b"] = bias_ih + summed
        packed["b_hh"] = bias_hh[inner].clone()
        return packed

    def torch_state(self, state: State) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The state as torch's module takes it: (h, c) for nn.LSTM, h for the others."""
        return state if len(state) > 1 else state[0]

    def from_torch_state(self, state: torch.Tensor | tuple[torch.Tensor, ...]) -> State:
        return tuple(state) if isinstance(state, tuple) else (state,)

    # ---- counts ----

    def num_parameters(self, inputs: int, hiddens: int, core: str) -> int:
        """A layer's parameters (counted from the registry's entry, which `lstmlm runs` reads
        without torch; tests/test_cells.py holds the two to agree)."""
        from . import num_parameters

        return num_parameters(self.name, self.form, inputs, hiddens, core)

    def step_flops(self, inputs: int, hiddens: int) -> int:
        """Floating-point operations of the products of one step of a layer, per batch row
        (a dense input's; one-hot input picks its rows instead): 2 · blocks·H · (I + H)."""
        return 2 * self.width * hiddens * (inputs + hiddens)

    # ---- the fast paths ----

    def stack(self, packed: Mapping[str, torch.Tensor], dtype: torch.dtype, ids: bool) -> Stacked:
        """The packed parameters as `Stacked` weights, outside autograd (the fast paths route the
        gradients back to the parameters themselves)."""
        with torch.no_grad():
            W_x, W_h, b = packed["W_x"], packed["W_h"], packed["b"]
            W_hT = transposed(W_h, dtype)
            b_h = None
            if self.recurrent_bias:
                b_h = torch.zeros_like(b)
                b_h[self.block(self.blocks[-1], W_h.shape[0])] = packed["b_hh"]
            if ids:
                return self.prepared(Stacked(W_hT, None, b.clone(), (W_x + b).T.contiguous(), b_h))
            return self.prepared(Stacked(W_hT, transposed(W_x, dtype), b.clone(), None, b_h))

    def rows(self, recurrent: torch.Tensor, inputs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """Generation's step on the stacked weights, batch-major, in torch (where the cell's kernel
        is not compiled): `recurrent` (batch, blocks·hiddens) is H_{t-1} W_h (+ b_h), `inputs`
        X_t W_x + b, both as `stack` made them; S (batch, hiddens), the cell's fp32 state, is
        updated in place; returns H_t."""
        raise NotImplementedError(f"the {self.title} ({self.form}) steps through its model's forward")

    def prepared(self, weights: Stacked) -> Stacked:
        """What the cell's kernel wants changed in its stacked weights (the LSTM doubles its
        candidate's rows); as they are by default."""
        return weights


def transposed(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ as a fresh contiguous matrix in `dtype`: BLAS multiplies a transposed view about half
    as fast at these shapes."""
    out = torch.empty((W.shape[1], W.shape[0]), dtype=dtype, device=W.device)
    return out.copy_(W.T)


def project(X: torch.Tensor, W_x: torch.Tensor) -> torch.Tensor:
    """X W_x for dense X, or the rows of W_x at the ids for one-hot X."""
    return W_x[X] if not X.is_floating_point() else X @ W_x
