"""The two recurrent cores: the article's from-scratch LSTM and torch's nn.LSTM, one interface.

Both take `X` — (steps, batch) int64 ids, read as one-hot vectors, or (steps, batch, inputs)
floats — and an optional state `(H, C)`, each (layers, batch, hiddens), and return every step's
top-layer H as (steps, batch, hiddens) and the final `(H, C)`.

The scratch core keeps the article's parameters and names, stored (inputs, hiddens) so the code
reads like the equations, which `cell` below writes once:

    I_t = σ(X_t W_xi + H_{t-1} W_hi + b_i)        input gate
    F_t = σ(X_t W_xf + H_{t-1} W_hf + b_f)        forget gate
    O_t = σ(X_t W_xo + H_{t-1} W_ho + b_o)        output gate
    C̃_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)     candidate memory cell
    C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t
    H_t = O_t ⊙ tanh(C_t)

For one-hot X_t, X_t W_x is the row of W_x at the character's id: a gather, never a product.
Training runs the same function on the fast path (`fused.py`); `cell` is the reference that
the readable loop and `lstmlm inspect` (which keeps every gate) run.

Regularization inside the cores, in training only (AWD-LSTM's; Merity, Keskar and Socher 2017,
"Regularizing and Optimizing LSTM Language Models"):

- DropConnect on the recurrent weights (Wan et al. 2013): each batch runs on W̃_h = W_h ⊙ M
  for one mask M, M_ij ~ Bernoulli(1 - p) / (1 - p), shared by every step and row of the
  batch, so E[W̃_h] = W_h and the recurrence H_{t-1} → H_t is regularized without a mask per
  step. W_x and b are left alone. The mask is drawn in the scratch core's packed layout
  (hiddens, 4·hiddens); nn.LSTM's weight_hh is W_hᵀ, so its core uses Mᵀ: same seed, same
  dropped weights.
- Dropout between layers: per element (Zaremba et al. 2014, as nn.LSTM does), or locked —
  one mask per sequence, shared by every time step (Gal and Ghahramani 2016's variational
  dropout), the same mask for X_t at every t as DropConnect's is for W_h.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .device import checks_ids
from .errors import ShapeError
from .fused import LSTMSequence, Stacked, as_dtype, block, compute_dtype, run_sequence, stack_weights

State = tuple[torch.Tensor, torch.Tensor]  # (H, C), each (layers, batch, hiddens)

GATES = ("i", "f", "o", "c")  # the article's order; nn.LSTM packs i, f, g(=c), o
PARAMETERS = tuple(f"{kind}{g}" for g in GATES for kind in ("W_x", "W_h", "b_"))  # a layer's twelve, by name


def dropconnect_mask(num_hiddens: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """DropConnect's M for one batch, in the scratch core's packed W_h layout (hiddens,
    4·hiddens): each entry 1 / (1 - p) with probability 1 - p, else 0, so E[W_h ⊙ M] = W_h.
    Drawn from torch's generator (saved in checkpoints) in `like`'s dtype and device."""
    M = torch.empty((num_hiddens, 4 * num_hiddens), dtype=like.dtype, device=like.device)  # a fixed shape and memory order, whichever core asks
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
    # contiguous first: the fast path's outputs are transposed views, and dropout draws its
    # mask in memory order; so both cores draw the same mask
    return F.dropout(X.contiguous(), p, training=True)


def project(X: torch.Tensor, W_x: torch.Tensor) -> torch.Tensor:
    """X W_x for dense X, or the rows of W_x at the ids for one-hot X."""
    return W_x[X] if not X.is_floating_point() else X @ W_x


class Gates(NamedTuple):
    """Every quantity of one step of the equations."""

    I: torch.Tensor
    F: torch.Tensor
    O: torch.Tensor
    C_tilde: torch.Tensor
    C: torch.Tensor
    H: torch.Tensor


def cell(XW: Mapping[str, torch.Tensor], H: torch.Tensor, C: torch.Tensor, p: Mapping[str, torch.Tensor]) -> Gates:
    """One step of the article's LSTM. `XW[g]` is X_t W_x{g} (already projected), H and C the
    previous step's, `p` the layer's parameters by name (W_hi, b_i, ...)."""
    I = torch.sigmoid(XW["i"] + H @ p["W_hi"] + p["b_i"])  # (batch, hiddens)
    F_ = torch.sigmoid(XW["f"] + H @ p["W_hf"] + p["b_f"])
    O = torch.sigmoid(XW["o"] + H @ p["W_ho"] + p["b_o"])
    C_tilde = torch.tanh(XW["c"] + H @ p["W_hc"] + p["b_c"])
    C = F_ * C + I * C_tilde
    H = O * torch.tanh(C)
    return Gates(I, F_, O, C_tilde, C, H)


class ScratchLSTMLayer(nn.Module):
    """One layer of the article's LSTM: four gates, each with W_x*, W_h*, b_*.

    The parameters are stored packed, as the fast path multiplies them: W_x (inputs, 4·hiddens),
    W_h (hiddens, 4·hiddens) and b (4·hiddens), the gates side by side in `fused.GATE_ORDER`
    (i, f, c̃, o: nn.LSTM's). The article's twelve — W_xi, W_hi, b_i, … — are views of them
    (`layer.W_xi`, `layer.views()`), so the readable loop and `lstmlm inspect` read the
    equations' names while one optimizer step updates three tensors.
    """

    W_x: nn.Parameter
    W_h: nn.Parameter
    b: nn.Parameter

    def __init__(self, num_inputs: int, num_hiddens: int) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens = num_inputs, num_hiddens
        self.W_x = nn.Parameter(torch.empty(num_inputs, 4 * num_hiddens))
        self.W_h = nn.Parameter(torch.empty(num_hiddens, 4 * num_hiddens))
        self.b = nn.Parameter(torch.empty(4 * num_hiddens))
        self._stacked_key: tuple[Any, ...] | None = None
        self._stacked: Stacked | None = None
        self._stacked_sources: list[torch.Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seed's init: weights N(0, 0.01²), biases 0, drawn matrix by matrix in the article's
        order (W_xi, W_hi, W_xf, …) so a seed gives the weights it gave the twelve-tensor layout."""
        with torch.no_grad():
            for g in GATES:
                for packed in (self.W_x, self.W_h):
                    cols = block(g, self.num_hiddens)
                    packed[:, cols] = torch.empty(packed.shape[0], self.num_hiddens, dtype=packed.dtype).normal_(0.0, 0.01)
            self.b.zero_()

    def views(self, W_h: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The article's twelve parameters by name, as views of the packed three; with `W_h`
        (DropConnect's W_h ⊙ M) in the parameter's place when given."""
        return {name: self.view(name, W_h) for name in PARAMETERS}

    def view(self, name: str, W_h: torch.Tensor | None = None) -> torch.Tensor:
        kind, g = name[:-1], name[-1]  # "W_x" "i", "b_" "c"
        cols = block(g, self.num_hiddens)
        return {"W_x": self.W_x, "W_h": self.W_h if W_h is None else W_h, "b_": self.b}[kind][..., cols]

    def __getattr__(self, name: str) -> Any:
        if name in PARAMETERS:
            return self.view(name)
        return super().__getattr__(name)

    def forward(
        self, X: torch.Tensor, H: torch.Tensor, C: torch.Tensor, W_h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The article's loop, one step at a time: the readable reference. `W_h`, when given,
        replaces the parameter for the whole sequence (DropConnect's W_h ⊙ M)."""
        p = self.views(W_h)  # the twelve, by the article's names
        outputs = []
        for X_t in X:  # X_t: (batch,) ids or (batch, inputs)
            step = cell({g: project(X_t, p[f"W_x{g}"]) for g in GATES}, H, C, p)
            H, C = step.H, step.C
            outputs.append(H)
        return torch.stack(outputs), H, C  # (steps, batch, hiddens)

    def stacked(self, dtype: torch.dtype, ids: bool = False, W_h: torch.Tensor | None = None) -> Stacked:
        """The layer's `Stacked` forward weights in `dtype`, for id (`ids`) or dense inputs, with
        `W_h` in place of the parameter when given (DropConnect's W_h ⊙ M: new every batch, so
        never cached).

        Without autograd (generation, evaluation) the result is cached until a parameter
        changes — its version counter moves on every in-place update and load_state_dict, its
        address on reassignment — so generating one character at a time does not copy the
        weights per character. The cache keeps aliases of the parameters so their storage
        cannot be freed and its address reused under a stale key. (Writes through `.data`
        move no version counter: they are invisible here as they are to autograd.) With
        autograd on, parameters change every step and stacking is cheap next to the step.
        """
        params = (self.W_x, self.W_h if W_h is None else W_h, self.b)
        if torch.is_grad_enabled() or params[1] is not self.W_h:
            return stack_weights(*params, dtype, ids)
        key = (dtype, ids, *((p.data_ptr(), p._version) for p in params))
        if self._stacked is None or self._stacked_key != key:
            self._stacked, self._stacked_key = stack_weights(*params, dtype, ids), key
            self._stacked_sources = [p.detach() for p in params]
        return self._stacked

    def fast_forward(
        self, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, dtype: torch.dtype, W_h: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer on the fast path: every step's H (steps, batch, hiddens) in `dtype`, and C_T.

        `W_h`, when given, runs in the parameter's place (DropConnect's W_h ⊙ M): the fast path
        takes it as its W_h, so the gradient it returns for it reaches the parameter through
        the product with M, by autograd."""
        W_h = self.W_h if W_h is None else W_h
        weights = self.stacked(dtype, ids=not X.is_floating_point(), W_h=W_h)
        if torch.is_grad_enabled():
            return cast(tuple[torch.Tensor, torch.Tensor], LSTMSequence.apply(X, H_0, C_0, weights, self.W_x, W_h, self.b))
        seq = run_sequence(X, H_0, C_0, weights, W_h.dtype)  # without autograd: evaluation
        return seq.Hs[1:].transpose(1, 2), seq.Cs[-1].T


class ScratchLSTM(nn.Module):
    """The article's LSTM, stacked `num_layers` deep with dropout between layers (as nn.LSTM;
    `locked`: one mask per sequence) and DropConnect on each layer's W_h at rate `weight_drop`.

    `fused=False` runs the literal per-gate loop, the readable reference; `fused=True` (the
    default) the fast path (`fused.LSTMSequence`). Both compute the same function on the same
    parameters. Under autocast the fast path multiplies in autocast's dtype (bf16) and keeps the
    cell state, the returned state and the weight gradients in the parameters' dtype.
    """

    def __init__(
        self,
        num_inputs: int,
        num_hiddens: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        fused: bool = True,
        locked: bool = False,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.dropout, self.fused, self.locked, self.weight_drop = dropout, fused, locked, weight_drop
        self.layers = nn.ModuleList(
            ScratchLSTMLayer(num_inputs if k == 0 else num_hiddens, num_hiddens) for k in range(num_layers)
        )

    def scratch_layers(self) -> list[ScratchLSTMLayer]:
        return [cast(ScratchLSTMLayer, layer) for layer in self.layers]

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        layers = self.scratch_layers()
        weight = layers[0].W_x
        H_0, C_0 = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, weight)
        dtype = compute_dtype(weight)
        Hs, Cs = [], []
        for k, (layer, W_h) in enumerate(zip(layers, self.recurrent_weights())):
            if k > 0 and self.training:
                X = drop(X, self.dropout, self.locked)
            if self.fused:
                X, C = layer.fast_forward(X, H_0[k], C_0[k], dtype, W_h)
                H = X[-1]
            else:
                X, H, C = layer(X, H_0[k], C_0[k], W_h)
            Hs.append(H)
            Cs.append(C)
        C = torch.stack(Cs)  # (layers, batch, hiddens)
        return X, (as_dtype(torch.stack(Hs), C.dtype), C)

    def recurrent_weights(self) -> list[torch.Tensor]:
        """Each layer's W_h as this batch's recurrence uses it: in training with DropConnect,
        W_h ⊙ M (differentiable: dL/dW_h = dL/dW̃_h ⊙ M), else the parameter itself. Every
        layer's M is drawn before any activation dropout, as nn.LSTM's core draws them."""
        layers = self.scratch_layers()
        if not (self.training and self.weight_drop > 0):
            return [layer.W_h for layer in layers]
        return [layer.W_h * dropconnect_mask(self.num_hiddens, self.weight_drop, layer.W_h) for layer in layers]  # (hiddens, 4·hiddens)


class CudnnLSTM(nn.Module):
    """torch.nn.LSTM (cuDNN on a GPU, oneDNN on a CPU) behind the scratch core's interface,
    with the scratch core's regularization: DropConnect on weight_hh and locked dropout between
    layers, both through functional weights (`torch.func.functional_call`), never by changing
    the module's own parameters or internals."""

    def __init__(
        self, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0, locked: bool = False, weight_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.dropout, self.locked, self.weight_drop = dropout, locked, weight_drop
        by_layer = locked and dropout > 0 and num_layers > 1  # nn.LSTM's own dropout between layers is per element
        self.lstm = nn.LSTM(num_inputs, num_hiddens, num_layers, dropout=dropout if num_layers > 1 and not by_layer else 0.0)
        # For locked dropout between layers, training runs one layer at a time on this module's
        # weights: through one-layer nn.LSTMs of the same sizes whose own parameters are never
        # used (on the meta device: no memory; a tuple: not submodules, nothing in the state dict).
        self.layer_kernels: tuple[nn.LSTM, ...] = (
            tuple(nn.LSTM(num_inputs if k == 0 else num_hiddens, num_hiddens, device="meta") for k in range(num_layers)) if by_layer else ()
        )

    @property
    def weight(self) -> torch.Tensor:
        """The first layer's input weights: their dtype and device are the core's."""
        return cast(torch.Tensor, self.lstm.weight_ih_l0)

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        weight = self.weight
        state = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, weight)
        if not X.is_floating_point():  # nn.LSTM multiplies its input: one-hot it (cheap at char vocab sizes)
            X = F.one_hot(X.long(), self.num_inputs).to(weight.dtype)
        dtype = compute_dtype(weight)
        regularized = self.training and (self.weight_drop > 0 or bool(self.layer_kernels))
        if dtype != weight.dtype or regularized:
            return self._functional_forward(dtype, X, state)
        outputs, (H, C) = self.lstm(X, state)  # the module's own (on a GPU, cuDNN-flattened) weights
        return outputs, (H, C)

    def _functional_forward(self, dtype: torch.dtype, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """nn.LSTM on this batch's weights (`functional_weights`) in `dtype`, with autocast off.

        Under autocast, on any device, it runs on `dtype` copies of the weights, input and state:
        oneDNN's CPU LSTM refuses autocast's mixed dtypes, and on a GPU autocast would cast
        cuDNN's RNN to fp16 whatever dtype it was asked for (and with no gradient scaler). So
        bf16 reaches the kernel as bf16. The casts and masks are differentiable, so the
        gradients still reach the fp32 parameters; the returned state (C above all, carried to
        the next batch) is in the parameters' dtype."""
        weights = self.functional_weights(dtype)
        with torch.autocast(X.device.type, enabled=False):
            X, state = X.to(dtype), (state[0].to(dtype), state[1].to(dtype))
            if self.training and self.layer_kernels:
                outputs, (H, C) = self._layer_by_layer(weights, X, state)
            else:
                outputs, (H, C) = functional_call(self.lstm, weights, (X, state))
        return outputs, (H.to(self.weight.dtype), C.to(self.weight.dtype))

    def functional_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """nn.LSTM's parameters by name as this batch uses them, in `dtype`. In training with
        DropConnect, weight_hh_l{k} ⊙ M_kᵀ: M_k drawn in the scratch core's layout (hiddens,
        4·hiddens), layer after layer, as the scratch core draws its own, since weight_hh is W_hᵀ."""
        weights: dict[str, torch.Tensor] = dict(self.lstm.named_parameters())
        if self.training and self.weight_drop > 0:
            for k in range(self.num_layers):
                W_hT = weights[f"weight_hh_l{k}"]  # (4·hiddens, hiddens)
                weights[f"weight_hh_l{k}"] = W_hT * dropconnect_mask(self.num_hiddens, self.weight_drop, W_hT).T
        return {name: as_dtype(p, dtype) for name, p in weights.items()}

    def _layer_by_layer(self, weights: dict[str, torch.Tensor], X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The layers one at a time on `weights`, with locked dropout between them."""
        H_0, C_0 = state
        Hs, Cs = [], []
        for k, kernel in enumerate(self.layer_kernels):
            if k > 0:
                X = drop(X, self.dropout, locked=True)
            own = {f"{kind}_l0": weights[f"{kind}_l{k}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            X, (H, C) = functional_call(kernel, own, (X, (H_0[k : k + 1], C_0[k : k + 1])))  # (steps, batch, hiddens)
            Hs.append(H)
            Cs.append(C)
        return X, (torch.cat(Hs), torch.cat(Cs))  # (layers, batch, hiddens) each


def zero_state(num_layers: int, batch_size: int, num_hiddens: int, like: torch.Tensor) -> State:
    shape = (num_layers, batch_size, num_hiddens)
    return torch.zeros(shape, dtype=like.dtype, device=like.device), torch.zeros(shape, dtype=like.dtype, device=like.device)


def check_input(
    X: torch.Tensor, state: State | None, num_inputs: int, num_hiddens: int, num_layers: int, weight: torch.Tensor
) -> State:
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
        return zero_state(num_layers, batch_size, num_hiddens, weight)
    if not isinstance(state, tuple) or len(state) != 2:
        raise ShapeError("state must be a tuple (H, C)")
    expected = (num_layers, batch_size, num_hiddens)
    for name, S in zip("HC", state):
        if tuple(S.shape) != expected:
            raise ShapeError(f"state {name} must be {expected} (layers, batch, hiddens), got {tuple(S.shape)}")
        if not S.is_floating_point():
            raise ShapeError(f"state {name} must be floating point, got {S.dtype}")
    return state
