"""The two cores of any cell, one interface: the scratch core (the cell's own equations) and the
torch core (nn.LSTM, nn.GRU or nn.RNN: cuDNN on a GPU, oneDNN on a CPU).

Both take `X` — (steps, batch) int64 ids, read as one-hot vectors, or (steps, batch, inputs)
floats — and an optional state, a tuple of (layers, batch, hiddens) tensors named by the cell,
and return every step's top-layer H as (steps, batch, hiddens) and the final state.

Regularization inside the cores, in training only (AWD-LSTM's; Merity, Keskar and Socher 2017,
"Regularizing and Optimizing LSTM Language Models"):

- DropConnect on the recurrent weights (Wan et al. 2013): each batch runs on W̃_h = W_h ⊙ M
  for one mask M, M_ij ~ Bernoulli(1 - p) / (1 - p), shared by every step and row of the
  batch, so E[W̃_h] = W_h and the recurrence H_{t-1} → H_t is regularized without a mask per
  step. W_x and b are left alone. The mask is drawn in the scratch core's packed layout
  (hiddens, blocks·hiddens); torch's weight_hh is W_hᵀ, so its core uses Mᵀ: same seed, same
  dropped weights.
- Dropout between layers: per element (Zaremba et al. 2014, as torch's modules do), or locked —
  one mask per sequence, shared by every time step (Gal and Ghahramani 2016's variational
  dropout), the same mask for X_t at every t as DropConnect's is for W_h.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import recurrence
from ..device import checks_ids
from ..errors import ShapeError
from .base import TORCH_PARAMETERS, Cell, Stacked, State, project


def dropconnect_mask(cell: Cell, num_hiddens: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """DropConnect's M for one batch, in the scratch core's packed W_h layout (hiddens,
    blocks·hiddens): each entry 1 / (1 - p) with probability 1 - p, else 0, so E[W_h ⊙ M] = W_h.
    Drawn from torch's generator (saved in checkpoints) in `like`'s dtype and device."""
    M = torch.empty((num_hiddens, cell.width * num_hiddens), dtype=like.dtype, device=like.device)  # a fixed shape and memory order, whichever core asks
    return M.bernoulli_(1 - p).div_(1 - p)


def drop(X: torch.Tensor, p: float, locked: bool) -> torch.Tensor:
    """Dropout on (steps, batch, features) activations at rate p: per element, or `locked`
    (variational), one mask per sequence (1, batch, features) that every step shares. X itself
    for p = 0."""
    if p == 0:
        return X
    if locked:
        mask = X.new_empty((1, *X.shape[1:])).bernoulli_(1 - p).div_(1 - p)  # (1, batch, features): a fresh, contiguous draw
        return X * mask
    # contiguous first: the fast paths' outputs are transposed views, and dropout draws its
    # mask in memory order; so both cores draw the same mask
    return F.dropout(X.contiguous(), p, training=True)


class ScratchLayer(nn.Module):
    """One layer of a cell's equations, its parameters packed (see `base`): W_x, W_h, b (and
    b_hh where the cell has one). The article's names — `layer.W_xi`, `layer.views()` — are
    views of them."""

    W_x: nn.Parameter
    W_h: nn.Parameter
    b: nn.Parameter

    def __init__(self, cell: Cell, num_inputs: int, num_hiddens: int) -> None:
        super().__init__()
        self.cell, self.num_inputs, self.num_hiddens = cell, num_inputs, num_hiddens
        G = cell.width
        self.W_x = nn.Parameter(torch.empty(num_inputs, G * num_hiddens))
        self.W_h = nn.Parameter(torch.empty(num_hiddens, G * num_hiddens))
        self.b = nn.Parameter(torch.empty(G * num_hiddens))
        if cell.recurrent_bias:
            self.b_hh = nn.Parameter(torch.empty(num_hiddens))
        self._stacked_key: tuple[Any, ...] | None = None
        self._stacked: Stacked | None = None
        self._stacked_sources: list[torch.Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seed's init: weights N(0, 0.01²), biases 0, drawn matrix by matrix in the order
        the seed's code draws them (W_xi, W_hi, W_xf, … for the LSTM)."""
        with torch.no_grad():
            for g in self.cell.init_order:
                cols = self.cell.block(g, self.num_hiddens)
                for packed in (self.W_x, self.W_h):
                    packed[:, cols] = torch.empty(packed.shape[0], self.num_hiddens, dtype=packed.dtype).normal_(0.0, 0.01)
            for name in self.cell.packed_names()[2:]:
                getattr(self, name).zero_()

    def packed(self, W_h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The packed parameters by name, with `W_h` (DropConnect's W_h ⊙ M) in the parameter's place when given."""
        packed: dict[str, torch.Tensor] = {name: getattr(self, name) for name in self.cell.packed_names()}
        if W_h is not None:
            packed["W_h"] = W_h
        return packed

    def views(self, W_h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The article's parameters by name, as views of the packed ones."""
        return self.cell.views(self.packed(), W_h)

    def __getattr__(self, name: str) -> Any:
        cell = self.__dict__.get("cell")
        if cell is not None and name in cell.parameter_names() and name not in cell.packed_names():
            return self.views()[name]
        return super().__getattr__(name)

    def forward(self, X: torch.Tensor, state: State, W_h: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """The cell's equations, one step at a time: the readable reference (the `loop` path).
        `state`: this layer's, each (batch, hiddens). `W_h`, when given, replaces the parameter
        for the whole sequence (DropConnect's W_h ⊙ M)."""
        p = self.views(W_h)  # by the article's names
        outputs = []
        for X_t in X:  # X_t: (batch,) ids or (batch, inputs)
            step = self.cell.step({g: project(X_t, p[f"W_x{g}"]) for g in self.cell.blocks}, state, p)
            state = self.cell.next_state(step)
            outputs.append(state[0])
        return torch.stack(outputs), state  # (steps, batch, hiddens)

    def stacked(self, dtype: torch.dtype, ids: bool = False, W_h: torch.Tensor | None = None) -> Stacked:
        """The layer's `Stacked` weights in `dtype`, for id (`ids`) or dense inputs, with `W_h` in
        place of the parameter when given (DropConnect's W_h ⊙ M: new every batch, so never cached).

        Without autograd (generation, evaluation) the result is cached until a parameter
        changes — its version counter moves on every in-place update and load_state_dict, its
        address on reassignment — so generating one character at a time does not copy the
        weights per character. The cache keeps aliases of the parameters so their storage
        cannot be freed and its address reused under a stale key. (Writes through `.data`
        move no version counter: they are invisible here as they are to autograd.) With
        autograd on, parameters change every step and stacking is cheap next to the step.
        """
        packed = self.packed(W_h)
        if torch.is_grad_enabled() or (W_h is not None and W_h is not self.W_h):
            return self.cell.stack(packed, dtype, ids)
        params = list(packed.values())
        key = (dtype, ids, *((p.data_ptr(), p._version) for p in params))
        if self._stacked is None or self._stacked_key != key:
            self._stacked, self._stacked_key = self.cell.stack(packed, dtype, ids), key
            self._stacked_sources = [p.detach() for p in params]
        return self._stacked


class ScratchCore(nn.Module):
    """A cell's equations, stacked `num_layers` deep with dropout between layers (as torch's
    modules; `locked`: one mask per sequence) and DropConnect on each layer's W_h at rate
    `weight_drop`.

    Its recurrence runs by one `path` (`recurrence.py`), chosen once when the core is built:
    `loop` (the readable equations), `fused` (the LSTM's Python fast path, with a hand-written
    backward) or `compiled` (the cell's kernel in C++, on a CPU). Every path computes the same
    function on the same parameters. Under autocast the fast paths multiply in autocast's dtype
    (bf16) and keep the carried state, the returned state and the weight gradients in the
    parameters' dtype.
    """

    def __init__(
        self,
        cell: Cell,
        num_inputs: int,
        num_hiddens: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        locked: bool = False,
        weight_drop: float = 0.0,
        path: str = "auto",
        device: torch.device | str = "cpu",
        build: bool = True,
    ) -> None:
        """`path` and `device`: see `recurrence.choose`; without `build`, a compiled path is
        chosen where a compiler could build it, and `settle` builds it."""
        super().__init__()
        self.cell, self.num_inputs, self.num_hiddens, self.num_layers = cell, num_inputs, num_hiddens, num_layers
        self.dropout, self.locked, self.weight_drop = dropout, locked, weight_drop
        self.layers = nn.ModuleList(ScratchLayer(cell, num_inputs if k == 0 else num_hiddens, num_hiddens) for k in range(num_layers))
        self.requested, self.build = path, build
        self.choice = recurrence.choose(cell, path, torch.device(device), build)

    @property
    def path(self) -> str:
        return self.choice.path

    def settle(self) -> str:
        """Build the compiled recurrence where it was chosen without being built; the reason it
        could not be, and the path taken instead, or ""."""
        self.choice = recurrence.settle(self.choice, self.cell, self.scratch_layers()[0].W_x.device)
        return self.choice.why

    def _apply(self, fn: Any, recurse: bool = True) -> ScratchCore:
        """Moving the parameters (`.to(device)`, `.double()`) chooses the path again, for where
        and what they are now: a core built on a CPU and moved to a GPU runs the GPU's path."""
        super()._apply(fn, recurse)
        W_x = self.scratch_layers()[0].W_x
        self.choice = recurrence.choose(self.cell, self.requested, W_x.device, self.build, W_x.dtype)
        return self

    def scratch_layers(self) -> list[ScratchLayer]:
        return [layer for layer in self.layers if isinstance(layer, ScratchLayer)]

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        layers = self.scratch_layers()
        weight = layers[0].W_x
        state = check_input(X, state, self.cell, self.num_inputs, self.num_hiddens, self.num_layers, weight)
        finals = []
        for k, (layer, W_h) in enumerate(zip(layers, self.recurrent_weights())):
            if k > 0 and self.training:
                X = drop(X, self.dropout, self.locked)
            X, final = recurrence.run_layer(self.choice, layer, X, tuple(S[k] for S in state), W_h)
            finals.append(final)
        return X, tuple(torch.stack([final[i] for final in finals]).to(weight.dtype) for i in range(len(self.cell.state)))

    def recurrent_weights(self) -> list[torch.Tensor]:
        """Each layer's W_h as this batch's recurrence uses it: in training with DropConnect,
        W_h ⊙ M (differentiable: dL/dW_h = dL/dW̃_h ⊙ M), else the parameter itself. Every
        layer's M is drawn before any activation dropout, as torch's core draws them."""
        layers = self.scratch_layers()
        if not (self.training and self.weight_drop > 0):
            return [layer.W_h for layer in layers]
        return [layer.W_h * dropconnect_mask(self.cell, self.num_hiddens, self.weight_drop, layer.W_h) for layer in layers]


class TorchCore(nn.Module):
    """torch's module for the cell (nn.LSTM, nn.GRU, nn.RNN with tanh; cuDNN on a GPU, oneDNN on
    a CPU) behind the scratch core's interface, with the scratch core's regularization:
    DropConnect on weight_hh and locked dropout between layers, both through functional weights
    (`torch.func.functional_call`), never by changing the module's own parameters or internals.
    The module is an attribute named after the cell (`core.lstm.weight_ih_l0`, …)."""

    def __init__(
        self, cell: Cell, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0, locked: bool = False, weight_drop: float = 0.0
    ) -> None:
        super().__init__()
        if not cell.torch_equivalent:
            raise ShapeError(f"the {cell.title} in its {cell.form} form has no torch module that computes it: train it with the scratch core")
        self.cell, self.num_inputs, self.num_hiddens, self.num_layers = cell, num_inputs, num_hiddens, num_layers
        self.dropout, self.locked, self.weight_drop = dropout, locked, weight_drop
        by_layer = locked and dropout > 0 and num_layers > 1  # torch's own dropout between layers is per element
        module = cell.torch_module(num_inputs, num_hiddens, num_layers, dropout=dropout if num_layers > 1 and not by_layer else 0.0)
        self.add_module(cell.name, module)
        # For locked dropout between layers, training runs one layer at a time on this module's
        # weights: through one-layer modules of the same sizes whose own parameters are never
        # used (on the meta device: no memory; a tuple: not submodules, nothing in the state dict).
        self.layer_kernels: tuple[nn.RNNBase, ...] = (
            tuple(cell.torch_module(num_inputs if k == 0 else num_hiddens, num_hiddens, device="meta") for k in range(num_layers)) if by_layer else ()
        )

    @property
    def module(self) -> nn.RNNBase:
        module: nn.RNNBase = getattr(self, self.cell.name)
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The first layer's input weights: their dtype and device are the core's."""
        return cast(torch.Tensor, self.module.weight_ih_l0)

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        weight = self.weight
        state = check_input(X, state, self.cell, self.num_inputs, self.num_hiddens, self.num_layers, weight)
        if not X.is_floating_point():  # torch's modules multiply their input: one-hot it (cheap at char vocab sizes)
            X = F.one_hot(X.long(), self.num_inputs).to(weight.dtype)
        dtype = recurrence.compute_dtype(weight)
        regularized = self.training and (self.weight_drop > 0 or bool(self.layer_kernels))
        if dtype != weight.dtype or regularized:
            return self._functional_forward(dtype, X, state)
        outputs, final = self.module(X, self.cell.torch_state(state))  # the module's own (on a GPU, cuDNN-flattened) weights
        return outputs, self.cell.from_torch_state(final)

    def _functional_forward(self, dtype: torch.dtype, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The module on this batch's weights (`functional_weights`) in `dtype`, with autocast off.

        Under autocast, on any device, it runs on `dtype` copies of the weights, input and state:
        oneDNN's CPU RNNs refuse autocast's mixed dtypes, and on a GPU autocast would cast
        cuDNN's RNN to fp16 whatever dtype it was asked for (and with no gradient scaler). So
        bf16 reaches the kernel as bf16. The casts and masks are differentiable, so the
        gradients still reach the fp32 parameters; the returned state (carried to the next
        batch) is in the parameters' dtype."""
        weights = self.functional_weights(dtype)
        with torch.autocast(X.device.type, enabled=False):
            X, state = X.to(dtype), tuple(S.to(dtype) for S in state)
            if self.training and self.layer_kernels:
                outputs, final = self._layer_by_layer(weights, X, state)
            else:
                outputs, torch_final = functional_call(self.module, weights, (X, self.cell.torch_state(state)))
                final = self.cell.from_torch_state(torch_final)
        return outputs, tuple(S.to(self.weight.dtype) for S in final)

    def functional_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The module's parameters by name as this batch uses them, in `dtype`. In training with
        DropConnect, weight_hh_l{k} ⊙ M_kᵀ: M_k drawn in the scratch core's layout (hiddens,
        blocks·hiddens), layer after layer, as the scratch core draws its own, since weight_hh is W_hᵀ."""
        weights: dict[str, torch.Tensor] = dict(self.module.named_parameters())
        if self.training and self.weight_drop > 0:
            for k in range(self.num_layers):
                W_hT = weights[f"weight_hh_l{k}"]  # (blocks·hiddens, hiddens)
                weights[f"weight_hh_l{k}"] = W_hT * dropconnect_mask(self.cell, self.num_hiddens, self.weight_drop, W_hT).T
        return {name: recurrence.as_dtype(p, dtype) for name, p in weights.items()}

    def _layer_by_layer(self, weights: dict[str, torch.Tensor], X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The layers one at a time on `weights`, with locked dropout between them."""
        finals = []
        for k, kernel in enumerate(self.layer_kernels):
            if k > 0:
                X = drop(X, self.dropout, locked=True)
            own = {f"{kind}_l0": weights[f"{kind}_l{k}"] for kind in TORCH_PARAMETERS}
            layer_state = tuple(S[k : k + 1] for S in state)
            X, final = functional_call(kernel, own, (X, self.cell.torch_state(layer_state)))  # (steps, batch, hiddens)
            finals.append(self.cell.from_torch_state(final))
        return X, tuple(torch.cat([final[i] for final in finals]) for i in range(len(self.cell.state)))  # (layers, batch, hiddens) each


def zero_state(cell: Cell, num_layers: int, batch_size: int, num_hiddens: int, like: torch.Tensor) -> State:
    shape = (num_layers, batch_size, num_hiddens)
    return tuple(torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in cell.state)


def check_input(X: torch.Tensor, state: State | None, cell: Cell, num_inputs: int, num_hiddens: int, num_layers: int, weight: torch.Tensor) -> State:
    """Refuse what would otherwise broadcast silently or fail deep inside a kernel; return the state."""
    if X.is_floating_point():
        if X.dim() != 3 or X.shape[2] != num_inputs:
            raise ShapeError(f"dense input must be (steps, batch, {num_inputs}), got {tuple(X.shape)}")
    elif X.dtype in (torch.int64, torch.int32):
        if X.dim() != 2:
            raise ShapeError(f"id input must be (steps, batch), got {tuple(X.shape)}")
        if checks_ids(X):  # on a CPU only: on a GPU it would cost a host sync per call
            low, high = (int(v) for v in torch.aminmax(X))
            if low < 0 or high >= num_inputs:
                raise ShapeError(f"ids must lie in [0, {num_inputs}), got [{low}, {high}]")
    else:
        raise ShapeError(f"input must be int64 or int32 ids or floating point, got {X.dtype}")
    batch_size = X.shape[1]
    if state is None:
        return zero_state(cell, num_layers, batch_size, num_hiddens, weight)
    names = ", ".join(cell.state)
    if not isinstance(state, tuple) or len(state) != len(cell.state):
        raise ShapeError(f"the {cell.title}'s state must be a tuple ({names})")
    expected = (num_layers, batch_size, num_hiddens)
    for name, S in zip(cell.state, state):
        if tuple(S.shape) != expected:
            raise ShapeError(f"state {name} must be {expected} (layers, batch, hiddens), got {tuple(S.shape)}")
        if not S.is_floating_point():
            raise ShapeError(f"state {name} must be floating point, got {S.dtype}")
    return state
