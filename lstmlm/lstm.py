"""The two recurrent cores: the article's from-scratch LSTM and torch's nn.LSTM, one interface.

Both take `X` — (steps, batch) int64 ids, read as one-hot vectors, or (steps, batch, inputs)
floats — and an optional state `(H, C)`, each (layers, batch, hiddens), and return every step's
top-layer H as (steps, batch, hiddens) and the final `(H, C)`.

The scratch core keeps the article's parameters and names, stored (inputs, hiddens) so the code
reads like the equations:

    I_t = σ(X_t W_xi + H_{t-1} W_hi + b_i)        input gate
    F_t = σ(X_t W_xf + H_{t-1} W_hf + b_f)        forget gate
    O_t = σ(X_t W_xo + H_{t-1} W_ho + b_o)        output gate
    C̃_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)     candidate memory cell
    C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t
    H_t = O_t ⊙ tanh(C_t)

For one-hot X_t, X_t W_x is the row of W_x at the character's id: a gather, never a product.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.autograd.function import FunctionCtx, once_differentiable

from .errors import ShapeError

State = tuple[torch.Tensor, torch.Tensor]  # (H, C), each (layers, batch, hiddens)

GATES = ("i", "f", "o", "c")  # the article's order; nn.LSTM packs i, f, g(=c), o
# The fast path's order: o first, so in backward the gates that take dL/dC (i, f, c̃) are side
# by side; the candidate last.
FAST_ORDER = ("o", "i", "f", "c")
FAST_NAMES = tuple(f"{kind}{g}" for kind in ("W_x", "W_h", "b_") for g in FAST_ORDER)


class Stacked(NamedTuple):
    """A layer's weights for the fast path's forward: the four gates side by side (FAST_ORDER),
    in the compute dtype, the candidate's columns doubled.

    Doubling them lets one sigmoid cover all four gates of a step, the candidate through
    tanh(x) = 2σ(2x) - 1: on a CPU a sigmoid costs less than half a tanh, and one operation
    over the whole (batch, 4·hiddens) row is large enough for torch to spread over the cores.
    """

    W_x: torch.Tensor  # (inputs, 4·hiddens)
    W_h: torch.Tensor  # (hiddens, 4·hiddens)
    b: torch.Tensor  # (4·hiddens,)
    W_xb: torch.Tensor | None  # W_x + b, whose rows id inputs gather; None for dense inputs


def project(X: torch.Tensor, W_x: torch.Tensor) -> torch.Tensor:
    """X W_x for dense X, or the rows of W_x at the ids for one-hot X."""
    return W_x[X] if not X.is_floating_point() else X @ W_x


class ScratchLSTMLayer(nn.Module):
    """One layer of the article's LSTM: four gates, each with W_x*, W_h*, b_*."""

    def __init__(self, num_inputs: int, num_hiddens: int) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens = num_inputs, num_hiddens
        for g in GATES:
            self.register_parameter(f"W_x{g}", nn.Parameter(torch.empty(num_inputs, num_hiddens)))
            self.register_parameter(f"W_h{g}", nn.Parameter(torch.empty(num_hiddens, num_hiddens)))
            self.register_parameter(f"b_{g}", nn.Parameter(torch.empty(num_hiddens)))
        self._stacked_key: tuple[Any, ...] | None = None
        self._stacked: Stacked | None = None
        self._stacked_sources: list[torch.Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seed's init: weights N(0, 0.01²), biases 0."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.normal_(0.0, 0.01) if name.startswith("W_") else p.zero_()

    def forward(self, X: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The article's loop, one gate at a time: the readable reference."""
        outputs = []
        for X_t in X:  # X_t: (batch,) ids or (batch, inputs)
            I = torch.sigmoid(project(X_t, self.W_xi) + H @ self.W_hi + self.b_i)  # (batch, hiddens)
            F_ = torch.sigmoid(project(X_t, self.W_xf) + H @ self.W_hf + self.b_f)
            O = torch.sigmoid(project(X_t, self.W_xo) + H @ self.W_ho + self.b_o)
            C_tilde = torch.tanh(project(X_t, self.W_xc) + H @ self.W_hc + self.b_c)
            C = F_ * C + I * C_tilde
            H = O * torch.tanh(C)
            outputs.append(H)
        return torch.stack(outputs), H, C  # (steps, batch, hiddens)

    def fast_params(self) -> tuple[nn.Parameter, ...]:
        """The twelve parameters in the fast path's order: W_x*, W_h*, b_* for gates o, i, f, c."""
        params = self._parameters  # a dict lookup: nn.Module.__getattr__ costs a microsecond a name
        return tuple(params[name] for name in FAST_NAMES)  # type: ignore[misc]

    def stacked(self, dtype: torch.dtype, ids: bool = False) -> Stacked:
        """The gates side by side in the fast path's order o, i, f, c, cast to `dtype`:
        W_x (inputs, 4·hiddens), W_h (hiddens, 4·hiddens), b (4·hiddens), and for `ids` input
        W_x + b, whose rows are X_t W_x + b.

        Without autograd (generation, evaluation) the result is cached until a parameter
        changes — its version counter moves on every in-place update and load_state_dict, its
        address on reassignment — so generating one character at a time does not copy the
        weights per character. The cache keeps aliases of the parameters so their storage
        cannot be freed and its address reused under a stale key. (Writes through `.data`
        move no version counter: they are invisible here as they are to autograd.) With
        autograd on, parameters change every step and stacking is cheap next to the step.
        """
        params = self.fast_params()
        if torch.is_grad_enabled():
            return stack_gates(params, dtype, ids)
        key = (dtype, ids, *((p.data_ptr(), p._version) for p in params))
        if self._stacked is None or self._stacked_key != key:
            self._stacked, self._stacked_key = stack_gates(params, dtype, ids), key
            self._stacked_sources = [p.detach() for p in params]
        return self._stacked


def stack_gates(params: tuple[torch.Tensor, ...], dtype: torch.dtype, ids: bool) -> Stacked:
    """The twelve parameters (FAST_ORDER) as `Stacked` forward weights, outside autograd: the
    fast path's Function routes the gradients back to the parameters itself. Doubling is
    exact in floating point."""
    with torch.no_grad():
        W_x = torch.cat([*params[0:3], 2 * params[3]], dim=1).to(dtype)  # (inputs, 4·hiddens)
        W_h = torch.cat([*params[4:7], 2 * params[7]], dim=1).to(dtype)  # (hiddens, 4·hiddens)
        b = torch.cat([*params[8:11], 2 * params[11]]).to(dtype)  # (4·hiddens,)
    return Stacked(W_x, W_h, b, W_x + b if ids else None)


def transposed(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """[W_o; W_i; W_f; W_c]ᵀ, (4·hiddens, inputs) contiguous: the backward's products take
    dGates (…, 4·hiddens) to the inputs, and a contiguous right operand is faster than a
    transposed view."""
    return torch.cat([W.T for W in weights]).to(dtype)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products: autocast's (bf16) where it is on, else the weights'."""
    device_type = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def input_projection(X: torch.Tensor, weights: Stacked) -> torch.Tensor:
    """X_t W_x + b for every step at once: (steps, batch, 4·hiddens), a fresh contiguous tensor.
    For ids, a gather of the rows of W_x + b."""
    steps, batch = X.shape[0], X.shape[1]
    if weights.W_xb is not None:
        return torch.index_select(weights.W_xb, 0, X.reshape(-1)).view(steps, batch, -1)
    XW = torch.addmm(weights.b, X.reshape(steps * batch, -1).to(weights.W_x.dtype), weights.W_x)  # (steps·batch, 4·hiddens)
    return XW.view(steps, batch, -1)


def gate_views(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four (steps, batch, hiddens) blocks of stacked gates (FAST_ORDER), as views."""
    return gates.unflatten(2, (4, -1)).unbind(2)


def forward_steps(gates: torch.Tensor, Hs: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_h: torch.Tensor) -> None:
    """The recurrence, in place: `gates` holds X_t W_x + b on entry and O, I, F, S on exit,
    where S = σ(2·c̃'s pre-activation), so C̃ = 2S - 1; Hs[t + 1], Cs[t + 1] and tanh_C[t]
    receive H_t, C_t and tanh(C_t). `W_h` is Stacked's, the candidate's columns doubled.

    Every view is made before the loop and every result written into a preallocated buffer:
    at batch 32 a step's arithmetic takes a few microseconds, as long as creating a tensor does.
    """
    pre = gates.unbind(0)  # (batch, 4·hiddens) per step
    O, I, F_, S = (g.unbind(0) for g in gate_views(gates))  # (batch, hiddens) per step
    H, C, tanh_C_ = Hs.unbind(0), Cs.unbind(0), tanh_C.unbind(0)
    for t in range(len(pre)):
        pre[t].addmm_(H[t], W_h)  # + H_{t-1} W_h: the four gates in one product
        pre[t].sigmoid_()  # O_t, I_t, F_t, and S_t with C̃_t = 2 S_t - 1
        # C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t = F_t ⊙ C_{t-1} + 2 I_t ⊙ S_t - I_t
        torch.mul(F_[t], C[t], out=C[t + 1]).addcmul_(I[t], S[t], value=2).sub_(I[t])
        torch.tanh(C[t + 1], out=tanh_C_[t])
        torch.mul(O[t], tanh_C_[t], out=H[t + 1])  # H_t = O_t ⊙ tanh(C_t)


def one_step(X_t: torch.Tensor, H: torch.Tensor, C: torch.Tensor, weights: Stacked) -> tuple[torch.Tensor, torch.Tensor]:
    """A single step without buffers or autograd: generation's unit of work, where building
    the sequence buffers would cost more than the arithmetic. X_t: (batch,) ids or (batch, inputs)."""
    if weights.W_xb is not None:
        gates = torch.index_select(weights.W_xb, 0, X_t)  # (batch, 4·hiddens)
    else:
        gates = torch.addmm(weights.b, X_t.to(weights.W_x.dtype), weights.W_x)
    gates.addmm_(H.to(gates.dtype), weights.W_h).sigmoid_()
    O, I, F_, S = gates.chunk(4, dim=1)
    C = torch.addcmul(F_ * C, I, S * 2 - 1)  # C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t, in C's dtype
    H = (O * torch.tanh(C)).to(gates.dtype)  # H_t = O_t ⊙ tanh(C_t)
    return H, C


def local_derivatives(gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the backward pass that do not depend on the recurrence, for every step
    at once (few large operations instead of many small ones), in the cell state's dtype.

    dGates_dHC (steps, batch, 4·hiddens), with σ' = σ (1 - σ) written in terms of the gate's
    value and C̃ = 2S - 1, so 1 - C̃² = 4 S (1 - S):

        o: tanh(C_t) σ'(o)    i: C̃_t σ'(i)    f: C_{t-1} σ'(f)    c̃: I_t (1 - C̃_t²)

    dL/d(o's pre-activation) is dL/dH_t times its o block; those of i, f, c̃ are dL/dC_t times
    theirs. And dC_dH = O_t (1 - tanh²(C_t)), the part of dL/dC_t that comes through H_t.
    """
    A = gates.to(Cs.dtype)  # O, I, F, S
    O, I, _, S = gate_views(A)
    dGates_dHC = torch.addcmul(A, A, A, value=-1)  # σ - σ² in every block: (steps, batch, 4·hiddens)
    d_o, d_i, d_f, d_c = gate_views(dGates_dHC)
    d_o.mul_(tanh_C)
    d_i.mul_(S * 2 - 1)  # C̃
    d_f.mul_(Cs[:-1])
    d_c.mul_(I).mul_(4)
    dC_dH = torch.addcmul(O, O * tanh_C, tanh_C, value=-1)  # O - O tanh²(C)
    return dGates_dHC, dC_dH


def backward_steps(
    dHs: torch.Tensor, dC_T: torch.Tensor | None, gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_hT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through time: dL/d(gate pre-activations) of every step, (steps, batch, 4·hiddens)
    in the compute dtype, and dL/dC_0. `dHs` is dL/dH_t from above (the outputs' gradient),
    W_hT the article's W_hᵀ (4·hiddens, hiddens).

        dL/dH_t = dHs[t] + dGates_{t+1} W_hᵀ
        dL/dC_t = dL/dC_{t+1} ⊙ F_{t+1} + dL/dH_t ⊙ dC_dH
    """
    dGates_dHC, dC_dH = local_derivatives(gates, Cs, tanh_C)
    steps, batch, hiddens = dC_dH.shape
    dGates = gates.new_empty(gates.shape)  # (steps, batch, 4·hiddens)
    dO = dGates[..., :hiddens].unbind(0)
    dIFC = dGates[..., hiddens:].unflatten(2, (3, hiddens)).unbind(0)  # (batch, 3, hiddens) per step
    dO_dH = dGates_dHC[..., :hiddens].unbind(0)
    dIFC_dC = dGates_dHC[..., hiddens:].unflatten(2, (3, hiddens)).unbind(0)
    dGates_, dHs_, F_, dC_dH_ = (x.unbind(0) for x in (dGates, dHs, gate_views(gates)[2], dC_dH))
    dH = dHs.new_empty((batch, hiddens))
    dC = dC_T.to(Cs.dtype, copy=True) if dC_T is not None else Cs.new_zeros((batch, hiddens))
    for t in reversed(range(steps)):
        if t == steps - 1:
            dH_t = dHs_[t]
        else:
            dH_t = torch.addmm(dHs_[t], dGates_[t + 1], W_hT, out=dH)  # from the output and from step t+1
            dC.mul_(F_[t + 1])  # through C_{t+1} = F_{t+1} ⊙ C_t + …
        dC.addcmul_(dH_t, dC_dH_[t])  # through H_t = O_t ⊙ tanh(C_t)
        torch.mul(dH_t, dO_dH[t], out=dO[t])
        torch.mul(dC.unsqueeze(1), dIFC_dC[t], out=dIFC[t])
    return dGates, dC.mul_(F_[0])


class Sequence(NamedTuple):
    """A layer's forward pass over a sequence: what backward through time needs."""

    gates: torch.Tensor  # (steps, batch, 4·hiddens): the activations O, I, F, S (C̃ = 2S - 1), compute dtype
    Hs: torch.Tensor  # (steps + 1, batch, hiddens): H_0 … H_T, compute dtype (the next product's input)
    Cs: torch.Tensor  # (steps + 1, batch, hiddens): C_0 … C_T, the parameters' dtype (fp32 under bf16)
    tanh_C: torch.Tensor  # (steps, batch, hiddens): tanh(C_1) … tanh(C_T)


def run_sequence(X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, state_dtype: torch.dtype) -> Sequence:
    """One layer over the whole sequence, outside autograd.

    No autocast guard is needed: every product's operands are already in the compute dtype,
    and autocast leaves in-place and out= operations alone."""
    steps, batch, hiddens = X.shape[0], X.shape[1], weights.W_h.shape[0]
    gates = input_projection(X, weights)  # (steps, batch, 4·hiddens)
    Hs = weights.W_h.new_empty((steps + 1, batch, hiddens))
    Cs = C_0.new_empty((steps + 1, batch, hiddens), dtype=state_dtype)
    tanh_C = Cs.new_empty((steps, batch, hiddens))
    Hs[0].copy_(H_0)
    Cs[0].copy_(C_0)
    forward_steps(gates, Hs, Cs, tanh_C, weights.W_h)
    return Sequence(gates, Hs, Cs, tanh_C)


class LSTMSequence(torch.autograd.Function):
    """One layer of the article's LSTM over a whole sequence, with a hand-written backward
    through time (as jcjohnson/torch-rnn for Torch): the gates' activations are kept in
    preallocated buffers, and each weight gradient is one large product over all steps
    instead of one small product per step.

    Inputs: X (steps, batch) ids or (steps, batch, inputs) floats, H_0 and C_0 (batch, hiddens),
    the layer's `Stacked` weights in the compute dtype, then the twelve parameters themselves
    (`ScratchLSTMLayer.fast_params()`), which autograd routes the gradients to.
    Outputs: H_1 … H_T (steps, batch, hiddens) in the compute dtype and C_T in the parameters'.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # an unused C_T needs no zero gradient
        seq = run_sequence(X, H_0, C_0, weights, params[0].dtype)
        # Saved through autograd, so an in-place change of the outputs (views of seq.Hs) before
        # backward is an error rather than a silently wrong gradient.
        ctx.save_for_backward(X, *seq, *params[0:8])
        ctx.input_dtypes = (X.dtype, H_0.dtype, C_0.dtype)
        return seq.Hs[1:], seq.Cs[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dHs: torch.Tensor | None, dC_T: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        X, gates, Hs, Cs, tanh_C, *W = ctx.saved_tensors
        X_dtype, H_0_dtype, C_0_dtype = ctx.input_dtypes
        needs = ctx.needs_input_grad
        W_hT = transposed(W[4:8], Hs.dtype)  # (4·hiddens, hiddens)
        dHs = Hs[1:].new_zeros(Hs[1:].shape) if dHs is None else dHs.to(Hs.dtype)
        dGates, dC_0 = backward_steps(dHs, dC_T, gates, Cs, tanh_C, W_hT)  # (steps, batch, 4·hiddens)
        dX = (dGates @ transposed(W[0:4], Hs.dtype)).to(X_dtype) if needs[0] else None  # (steps, batch, inputs)
        dH_0 = (dGates[0] @ W_hT).to(H_0_dtype) if needs[1] else None
        dC_0 = dC_0.to(C_0_dtype) if needs[2] else None
        num_inputs = W[0].shape[0]
        param_grads = weight_gradients(X, Hs[:-1], dGates, num_inputs, Cs.dtype) if any(needs[4:]) else (None,) * 12
        return dX, dH_0, dC_0, None, *param_grads


def weight_gradients(
    X: torch.Tensor, H_prev: torch.Tensor, dGates: torch.Tensor, num_inputs: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """dW_x, dW_h and db summed over every step and batch row, each one operation, split back
    into the twelve parameters' gradients (FAST_ORDER) in the parameters' dtype:

        dW_h = Σ_t H_{t-1}ᵀ dGates_t        dW_x = Σ_t X_tᵀ dGates_t        db = Σ_t Σ_batch dGates_t

    For ids, X_tᵀ dGates_t adds each row of dGates_t to the row of W_x at its id: an index_add.
    Under bf16 the products accumulate in fp32 inside the matmul; index_add and the bias sum
    accumulate in fp32 too.
    """
    dGates_2d = dGates.view(-1, dGates.shape[-1])  # (steps·batch, 4·hiddens)
    dW_h = (H_prev.reshape(-1, H_prev.shape[-1]).T @ dGates_2d).to(dtype)  # (hiddens, 4·hiddens)
    if X.is_floating_point():
        dW_x = (X.reshape(-1, X.shape[-1]).to(dGates.dtype).T @ dGates_2d).to(dtype)  # (inputs, 4·hiddens)
    else:
        dW_x = dW_h.new_zeros((num_inputs, dGates.shape[-1]))
        dW_x.index_add_(0, X.reshape(-1), dGates_2d.to(dtype))
    db = dGates_2d.sum(0, dtype=dtype)  # (4·hiddens,)
    return (*dW_x.chunk(4, dim=1), *dW_h.chunk(4, dim=1), *db.chunk(4))


class ScratchLSTM(nn.Module):
    """The article's LSTM, stacked `num_layers` deep with dropout between layers (as nn.LSTM).

    `fused=False` runs the literal per-gate loop, the readable reference; `fused=True` (the
    default) the fast path, `LSTMSequence`. Both compute the same function on the same
    parameters. Under autocast the fast path multiplies in autocast's dtype (bf16) and keeps the
    cell state, the returned state and the weight gradients in the parameters' dtype.
    """

    def __init__(self, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.dropout, self.fused = dropout, fused
        self.layers = nn.ModuleList(
            ScratchLSTMLayer(num_inputs if k == 0 else num_hiddens, num_hiddens) for k in range(num_layers)
        )

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        H_0, C_0 = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, self.layers[0].W_xi)
        dtype = compute_dtype(self.layers[0].W_xi)
        Hs, Cs = [], []
        for k, layer in enumerate(self.layers):
            if k > 0 and self.dropout > 0 and self.training:
                X = F.dropout(X, self.dropout, training=True)
            if self.fused:
                X, C = fast_layer(layer, X, H_0[k], C_0[k], dtype)
                H = X[-1]
            else:
                X, H, C = layer(X, H_0[k], C_0[k])
            Hs.append(H)
            Cs.append(C)
        C = torch.stack(Cs)  # (layers, batch, hiddens)
        return X, (torch.stack(Hs).to(C.dtype), C)


def fast_layer(layer: ScratchLSTMLayer, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer on the fast path: every step's H (steps, batch, hiddens) in `dtype`, and C_T."""
    weights = layer.stacked(dtype, ids=not X.is_floating_point())
    if torch.is_grad_enabled():
        return LSTMSequence.apply(X, H_0, C_0, weights, *layer.fast_params())
    state_dtype = layer.W_xi.dtype
    if X.shape[0] == 1:  # one step without autograd: generation
        H, C = one_step(X[0], H_0, C_0.to(state_dtype), weights)
        return H.unsqueeze(0), C
    seq = run_sequence(X, H_0, C_0, weights, state_dtype)  # without autograd: evaluation
    return seq.Hs[1:], seq.Cs[-1]


class CudnnLSTM(nn.Module):
    """torch.nn.LSTM (cuDNN on a GPU, oneDNN on a CPU) behind the scratch core's interface."""

    def __init__(self, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.lstm = nn.LSTM(num_inputs, num_hiddens, num_layers, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        state = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, self.lstm.weight_ih_l0)
        weight = self.lstm.weight_ih_l0
        if not X.is_floating_point():  # nn.LSTM multiplies its input: one-hot it (cheap at char vocab sizes)
            X = F.one_hot(X.long(), self.num_inputs).to(weight.dtype)
        dtype = compute_dtype(weight)
        if X.device.type == "cpu" and dtype != weight.dtype:
            return self._forward_in(dtype, X, state)
        outputs, (H, C) = self.lstm(X, state)
        return outputs, (H, C)

    def _forward_in(self, dtype: torch.dtype, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """oneDNN's CPU LSTM refuses autocast's mixed dtypes: run it on `dtype` copies of the
        weights, input and state instead. The casts are differentiable, so the gradients still
        reach the fp32 parameters; the returned state is in the parameters' dtype."""
        weights = {name: p.to(dtype) for name, p in self.lstm.named_parameters()}
        with torch.autocast(X.device.type, enabled=False):
            outputs, (H, C) = functional_call(self.lstm, weights, (X.to(dtype), (state[0].to(dtype), state[1].to(dtype))))
        return outputs, (H.to(self.lstm.weight_ih_l0.dtype), C.to(self.lstm.weight_ih_l0.dtype))


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
        if X.device.type == "cpu" and X.numel():  # on a GPU the check would cost a host sync per call
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
