"""Generation's step: a model's inference one character at a time, on a batch whose rows come
and go.

`Stepper` is the model rebuilt for inference: the scratch core's stacked weights (converted
from torch's for a cudnn model, the same function), the first layer's input projection folded
into a table with one row per character, and every buffer made once. At batch 1 a step is one
(1 × H)·(H × blocks·H) product a layer and the cell's elementwise part (compiled where the cell
has a kernel); going through the training model's forward, with its checks and fresh tensors,
cost four times as long. A cell whose step is not a product of H_{t-1} then an elementwise part
(the GRU's d2l form) steps through the model's own forward instead (`LoopStepper`).

The compiled step's product gives each row the same bits whatever the batch around it
(csrc/recurrence.cpp, `rows_times`), so a row that joins a batch continues exactly as it would
alone. torch's product (the Python step: on a GPU, or where nothing is compiled) is equal only
to float rounding across batch sizes.

A batch's rows leave by `keep` and join by `extend`; the state is the stepper's, and only the
stepper knows its layout (a cell's state is an opaque tuple to everything else).

`sample` makes a chunk of characters, each row's chosen by its own settings (choosing.Rows) and
fed back: compiled, the chunk is one call, the steps and choices in C++ with the interpreter's
lock let go; otherwise a step and a choice a character, the same characters.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, cast

import torch

from . import recurrence
from .cells.base import Stacked, State
from .model import CharLM, convert, packed_layer

if TYPE_CHECKING:
    from .choosing import Rows


def layer_weights(model: CharLM, dtype: torch.dtype) -> list[Stacked]:
    """Each layer's stacked weights in `dtype`, the first layer's input always as a table with a
    column per id: (X_t W_x + b)ᵀ for one-hot X_t, (E[id] W_x + b)ᵀ with an embedding E."""
    embedding, cell, scratch = model.embedding, model.cell, model.scratch_core
    if scratch is not None:
        weights = [layer.stacked(dtype, ids=(k == 0 and embedding is None)) for k, layer in enumerate(scratch.scratch_layers())]
    else:
        sd = convert(model.state_dict(), "scratch", cell)
        weights = [cell.stack(packed_layer(sd, k, cell), dtype, ids=(k == 0 and embedding is None)) for k in range(model.num_layers)]
    if embedding is not None:
        first = weights[0]
        assert first.W_xT is not None  # an embedding feeds the first layer dense input
        table = torch.addmm(first.b.float()[:, None], first.W_xT.float(), embedding.weight.detach().float().T)  # (blocks·hiddens, vocab)
        weights[0] = first._replace(W_xT=None, table=table.to(first.b.dtype))
    return weights


def everything_that_reads_H(W_in: torch.Tensor, b_in: torch.Tensor, W_h: torch.Tensor, b_h: torch.Tensor | None) -> torch.Tensor:
    """[[W_in, W_h], [b_in, b_h]]: (hiddens + 1, inputs + blocks·hiddens). [H_t, 1] times it is
    [H_t W_in + b_in, H_t W_h + b_h]: the reader's input and this layer's next recurrent term
    (b_h: a bias inside the recurrence, the GRU's b_hh; zero for the others)."""
    top = torch.cat([W_in, W_h], dim=1)
    inner = torch.zeros(W_h.shape[1], dtype=b_in.dtype, device=b_in.device) if b_h is None else b_h.to(b_in.dtype)
    bottom = torch.cat([b_in, inner])[None]
    return torch.cat([top, bottom]).contiguous()


class Stepper:
    """A model's inference one character at a time: `stepper(X_t)` takes a list of `batch` ids
    and returns the logits (batch, vocab) of the next character, advancing the state in place.

    Each layer's H_t is multiplied once, by every matrix that reads it: the next layer's W_x
    (the output layer's W_hq on top) and its own W_h for step t + 1, side by side in one
    product, the biases in a last row that a constant 1 after H_t picks up. At batch 1 that is
    one product a layer per character. The returned logits are a view that the next step
    overwrites. Dropout is never applied: this is inference. The products run in `dtype` (bf16
    as training's under bf16); the cell carries its fp32 state S (the LSTM's C; H itself for
    the others) beside H.
    """

    def __init__(self, model: CharLM, state: State, dtype: torch.dtype = torch.float32, compiled: bool | None = None) -> None:
        """`compiled`: step by the cell's compiled kernel; by default where the model's scratch
        core runs compiled, or, for torch's core, where the kernel can run here."""
        self.cell = model.cell
        weights = layer_weights(model, dtype)
        device = state[0].device
        assert weights[0].table is not None  # layer_weights always gives the first layer a table
        self.table = weights[0].table.T.to(dtype, copy=True).contiguous()  # (vocab, blocks·hiddens): X_t W_x + b_0 for each id
        self.rows = self.table.unbind(0)  # its rows as views made once: tensor[i] costs microseconds
        readers = [(w.W_xT.T, w.b) for w in weights[1:] if w.W_xT is not None] + [(model.W_hq.detach().to(dtype), model.b_q.detach().to(dtype))]
        self.W: list[torch.Tensor] = []  # per layer: [[W_in, W_h], [b_in, b_h]], (hiddens + 1, inputs of the reader + blocks·hiddens)
        self.widths: list[int] = []  # per layer: the reader's inputs, P's first columns
        for w, (W_in, b_in) in zip(weights, readers):
            self.W.append(everything_that_reads_H(W_in.to(dtype), b_in.to(dtype), w.W_hT.T, w.b_h))
            self.widths.append(W_in.shape[1])
        # The step compiled (the cell's kernel) where it can run: a step is then one call, where
        # the Python step issues a dozen operations a layer.
        if compiled is None:
            compiled = steps_compiled(model)
        self.compiled = compiled and device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self.packed = [recurrence.packed(W) for W in self.W] if self.compiled else []  # what the compiled step reads
        self._begin(state)

    def _begin(self, state: State) -> None:
        """The buffers of a batch that starts from `state`, each (layers, batch, hiddens)."""
        H_0, S_0 = state[0], state[-1]
        batch, hiddens = H_0.shape[1], H_0.shape[2]
        self.H1: list[torch.Tensor] = []  # per layer: [H_t, 1], (batch, hiddens + 1)
        self.P: list[torch.Tensor] = []  # per layer: [H_t W_in + b_in, H_t W_h + b_h], the product's output
        self.S: list[torch.Tensor] = []  # per layer: the fp32 state (batch, hiddens)
        for k, W in enumerate(self.W):
            H1 = torch.ones(batch, hiddens + 1, dtype=W.dtype, device=H_0.device)
            H1[:, :hiddens] = H_0[k]
            self.H1.append(H1)
            # the recurrent part, H_0 W_h + b_h, is the first step's: compiled, by the step's own
            # product, so that rows primed together start from the bits each has alone
            self.P.append(recurrence.times(H1, self.packed[k], H1.new_empty((batch, W.shape[1]))) if self.compiled else H1 @ W)
            self.S.append(S_0[k].to(torch.float32, copy=True).contiguous())
        self._views()

    def with_state(self, state: State) -> Stepper:
        """A stepper of these weights (shared, not copied) from `state`: what a server's request
        primes, where building the weights again would cost more than reading its prefix."""
        other = copy.copy(self)
        other._begin(state)
        return other

    def _views(self) -> None:
        """The views of the buffers a step reads: made again when the batch's rows change."""
        self.outputs = [P[:, :width] for P, width in zip(self.P, self.widths)]  # per layer: H_t W_in + b_in
        self.recurrent = [P[:, width:] for P, width in zip(self.P, self.widths)]  # per layer: H_t W_h + b_h
        self.logits = self.outputs[-1]
        self.picked = self.table.new_empty((self.H1[0].shape[0], self.table.shape[1]))  # the rows of a batch's ids

    @property
    def batch(self) -> int:
        return self.H1[0].shape[0]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` of the batch, in this order. Each buffer is copied once, as rows
        leave: not every step (see serve/batching.py for why rows leave rather than stay masked)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.table.device)
        self.H1, self.P, self.S = ([t.index_select(0, index) for t in ts] for ts in (self.H1, self.P, self.S))
        self._views()

    def extend(self, other: Stepper) -> None:
        """Add `other`'s rows (the same model's stepper, in the same dtype) after this one's."""
        self.H1, self.P, self.S = (
            [torch.cat([a, b]) for a, b in zip(mine, theirs)] for mine, theirs in ((self.H1, other.H1), (self.P, other.P), (self.S, other.S))
        )
        self._views()

    def __call__(self, X_t: list[int] | torch.Tensor) -> torch.Tensor:
        """X_t: the ids, a list (batch 1: a row view is the cheapest input) or a tensor (batch > 1)."""
        if self.compiled:
            ids = X_t if isinstance(X_t, torch.Tensor) else torch.tensor(X_t)
            recurrence.ops(self.cell, "step")(ids, self.table, self.packed, self.H1, self.P, self.S)
            return self.logits
        if isinstance(X_t, list):
            inputs = self.rows[X_t[0]][None] if len(X_t) == 1 else self.table[X_t]
        else:
            inputs = torch.index_select(self.table, 0, X_t, out=self.picked)
        for H1, W, P, S, outputs, recurrent in zip(self.H1, self.W, self.P, self.S, self.outputs, self.recurrent):
            H1[:, :-1] = self.cell.rows(recurrent, inputs, S)  # the cell's elementwise part: S in place, H_t
            torch.mm(H1, W, out=P)
            inputs = outputs  # the next layer's X_t W_x + b
        return self.logits

    def greedy(self, X_t: list[int], steps: int) -> torch.Tensor:
        """`steps` greedy characters after reading X_t, each fed back: their ids (steps, batch)."""
        if self.compiled:
            ids = torch.tensor(X_t)
            return cast(torch.Tensor, recurrence.ops(self.cell, "greedy")(ids, steps, self.logits.shape[1], self.table, self.packed, self.H1, self.P, self.S))
        return greedy_each(self, X_t, steps)

    def sample(self, X_t: torch.Tensor, steps: int, rows: Rows) -> torch.Tensor:
        """`steps` characters after reading X_t (batch,), each row's chosen by `rows` and fed back:
        their ids (steps, batch), on the stepper's device."""
        if not (self.compiled and rows.compiled) or steps == 0:
            return sample_each(self, X_t, steps, rows)
        vocab = self.logits.shape[1]
        chosen = recurrence.ops(self.cell, "sample")(X_t, steps, vocab, self.table, self.packed, self.H1, self.P, self.S, *rows.settings(steps))
        rows.drawn(steps)
        return cast(torch.Tensor, chosen)


def greedy_each(step: Stepper | LoopStepper, X_t: list[int], steps: int) -> torch.Tensor:
    """`Stepper.greedy` a step and an argmax at a time: the ids (steps, batch)."""
    chosen = []
    for _ in range(steps):
        X_t = step(X_t).argmax(dim=-1).tolist()
        chosen.append(X_t)
    return torch.tensor(chosen, dtype=torch.long).reshape(steps, len(X_t))


def sample_each(step: Stepper | LoopStepper, X_t: torch.Tensor, steps: int, rows: Rows) -> torch.Tensor:
    """`Stepper.sample` a step and a choice at a time."""
    chosen = X_t.new_empty((steps, X_t.shape[0]))
    for t in range(steps):
        chosen[t].copy_(rows.choose(step(X_t)))  # the step reads X_t first
        X_t = chosen[t]
    return chosen


class LoopStepper:
    """One character at a time through the model's own forward (the cell's readable step): for a
    cell the `Stepper`'s products cannot express. Slower, and the same function."""

    def __init__(self, model: CharLM, state: State, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.state, self.dtype = model, state, dtype

    def with_state(self, state: State) -> LoopStepper:
        return LoopStepper(self.model, state, self.dtype)

    @property
    def batch(self) -> int:
        return self.state[0].shape[1]

    def keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.model.W_hq.device)
        self.state = tuple(t.index_select(1, index) for t in self.state)  # each (layers, batch, hiddens)

    def extend(self, other: LoopStepper) -> None:
        self.state = tuple(torch.cat([a, b], dim=1) for a, b in zip(self.state, other.state))

    def __call__(self, X_t: list[int] | torch.Tensor) -> torch.Tensor:
        ids = X_t if isinstance(X_t, torch.Tensor) else torch.tensor(X_t, device=self.model.W_hq.device)
        logits, self.state = self.model(ids[:, None], self.state)
        return cast(torch.Tensor, logits[:, 0])

    def greedy(self, X_t: list[int], steps: int) -> torch.Tensor:
        return greedy_each(self, X_t, steps)

    def sample(self, X_t: torch.Tensor, steps: int, rows: Rows) -> torch.Tensor:
        return sample_each(self, X_t, steps, rows)


def steps_compiled(model: CharLM) -> bool:
    """Whether `stepper(model, ...)` steps by the cell's compiled kernel: on a CPU, where the
    model's scratch core runs compiled or, for torch's core, where the kernel can run here."""
    device = model.W_hq.device
    if not model.cell.torch_equivalent or device.type != "cpu":
        return False
    return model.path == "compiled" or (model.scratch_core is None and "compiled" in recurrence.available(model.cell, device))


def stepper(model: CharLM, state: State, dtype: torch.dtype = torch.float32) -> Stepper | LoopStepper:
    """The stepper for `model`: on its stacked weights where the cell's step is a product then an
    elementwise part, else through its forward."""
    return Stepper(model, state, dtype) if model.cell.torch_equivalent else LoopStepper(model, state, dtype)
