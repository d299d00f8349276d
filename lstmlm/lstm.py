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
    """A layer's weights for the fast path's forward, in the compute dtype: the gates stacked
    in FAST_ORDER, transposed for the feature-major products, the candidate's rows doubled.

    Doubling them lets one sigmoid cover all four gates of a step, the candidate through
    tanh(x) = 2σ(2x) - 1: on a CPU a sigmoid costs less than half a tanh, and one operation
    over a step's whole (4·hiddens, batch) gates is large enough for torch to spread over cores.
    """

    W_xT: torch.Tensor | None  # (4·hiddens, inputs) for dense inputs; None for ids
    W_hT: torch.Tensor  # (4·hiddens, hiddens)
    b: torch.Tensor  # (4·hiddens,)
    W_xb: torch.Tensor | None  # (inputs, 4·hiddens): W_x + b, whose rows ids gather; None for dense inputs


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
        """The layer's `Stacked` forward weights in `dtype`, for id (`ids`) or dense inputs.

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
    W_xo, W_xi, W_xf, W_xc, W_ho, W_hi, W_hf, W_hc, b_o, b_i, b_f, b_c = params
    with torch.no_grad():
        W_hT = torch.cat([W_ho.T, W_hi.T, W_hf.T, 2 * W_hc.T]).to(dtype)  # (4·hiddens, hiddens)
        b = torch.cat([b_o, b_i, b_f, 2 * b_c])  # (4·hiddens,)
        if ids:
            W_xb = torch.cat([W_xo, W_xi, W_xf, 2 * W_xc], dim=1) + b  # (inputs, 4·hiddens)
            return Stacked(None, W_hT, b.to(dtype), W_xb.to(dtype))
        W_xT = torch.cat([W_xo.T, W_xi.T, W_xf.T, 2 * W_xc.T]).to(dtype)  # (4·hiddens, inputs)
        return Stacked(W_xT, W_hT, b.to(dtype), None)


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products: autocast's (bf16) where it is on, else the weights'."""
    device_type = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def input_projection(X: torch.Tensor, weights: Stacked) -> torch.Tensor:
    """(X_t W_x + b)ᵀ for every step at once: (steps, 4·hiddens, batch), fresh and contiguous.

    For ids, a gather straight into that layout (gathering rows, then transposing them, costs
    four times as much here). For dense input, one batched product: X is then usually a fast
    layer's output, a transposed view of its (steps, hiddens, batch) buffer, so Xᵀ is free."""
    steps, batch = X.shape[0], X.shape[1]
    if weights.W_xb is not None:  # gates[t, g, b] = (W_x + b)[X[t, b], g], gathered in place
        W_xbT = weights.W_xb.T.expand(steps, -1, -1)  # (steps, 4·hiddens, inputs), no copy
        return torch.gather(W_xbT, 2, X[:, None, :].long().expand(-1, W_xbT.shape[1], -1))
    XT = X.transpose(1, 2).to(weights.W_hT.dtype)  # (steps, inputs, batch)
    return torch.matmul(weights.W_xT, XT).add_(weights.b[:, None])


def gate_views(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four (steps, hiddens, batch) blocks of feature-major gates (FAST_ORDER), as views."""
    return gates.unflatten(1, (4, -1)).unbind(1)


def forward_steps(gates: torch.Tensor, Hs: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_hT: torch.Tensor) -> None:
    """The recurrence, in place and feature-major (every per-step tensor transposed): `gates`
    (steps, 4·hiddens, batch) holds (X_t W_x + b)ᵀ on entry and O, I, F, S on exit, where
    S = σ(2·c̃'s pre-activation), so C̃ = 2S - 1; Hs[t + 1], Cs[t + 1] (hiddens, batch) and
    tanh_C[t] receive H_tᵀ, C_tᵀ and tanh(C_t)ᵀ. `W_hT` is Stacked's.

    Every view is made before the loop and every result written into a preallocated buffer:
    at batch 32 a step's arithmetic takes a few microseconds, as long as creating a tensor does.
    """
    pre = gates.unbind(0)  # (4·hiddens, batch) per step
    O, I, F_, S = (g.unbind(0) for g in gate_views(gates))  # (hiddens, batch) per step, contiguous
    H, C, tanh_C_ = Hs.unbind(0), Cs.unbind(0), tanh_C.unbind(0)
    for t in range(len(pre)):
        pre[t].addmm_(W_hT, H[t])  # + (H_{t-1} W_h)ᵀ = W_hᵀ H_{t-1}ᵀ: the four gates in one product
        pre[t].sigmoid_()  # O_t, I_t, F_t, and S_t with C̃_t = 2 S_t - 1
        # C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t = F_t ⊙ C_{t-1} + 2 I_t ⊙ S_t - I_t
        torch.mul(F_[t], C[t], out=C[t + 1]).addcmul_(I[t], S[t], value=2).sub_(I[t])
        torch.tanh(C[t + 1], out=tanh_C_[t])
        torch.mul(O[t], tanh_C_[t], out=H[t + 1])  # H_t = O_t ⊙ tanh(C_t)


class CellInPlace:
    """The elementwise half of a layer's step, batch-major, in place on buffers given once:
    generation's unit of work, where each operation at batch 1 is shorter than creating a
    tensor (or even a view), so `step` creates nothing.

    `gates` (batch, 4·hiddens) is to hold the pre-activations X_t W_x + H_{t-1} W_h + b in
    FAST_ORDER, the candidate doubled (see Stacked); `step` turns them into O_t, I_t, F_t,
    S_t, takes C (batch, hiddens) from C_{t-1} to C_t and writes H_t into H. C stays in its
    own dtype (fp32 under bf16), H in the products'. Any of them may be views.
    """

    def __init__(self, gates: torch.Tensor, C: torch.Tensor, H: torch.Tensor) -> None:
        self.gates, self.C, self.H = gates, C, H
        self.O, self.I, self.F, self.S = gates.chunk(4, dim=1)
        self.tanh_C = torch.empty_like(C)

    def step(self) -> None:
        self.gates.sigmoid_()
        # C_t = F_t ⊙ C_{t-1} + I_t ⊙ (2 S_t - 1)
        self.C.mul_(self.F).addcmul_(self.I, self.S, value=2).sub_(self.I)
        torch.tanh(self.C, out=self.tanh_C)
        torch.mul(self.O, self.tanh_C, out=self.H)  # H_t = O_t ⊙ tanh(C_t)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without the microseconds a no-op `.to` still costs."""
    return x if x.dtype == dtype else x.to(dtype)


def local_derivatives(gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the backward pass that do not depend on the recurrence, for every step
    at once (few large operations instead of many small ones), in the cell state's dtype.

    dGates_dHC (steps, 4·hiddens, batch), with σ' = σ (1 - σ) written in terms of the gate's
    value and C̃ = 2S - 1, so 1 - C̃² = 4 S (1 - S):

        o: tanh(C_t) σ'(o)    i: C̃_t σ'(i)    f: C_{t-1} σ'(f)    c̃: I_t (1 - C̃_t²)

    dL/d(o's pre-activation) is dL/dH_t times its o block; those of i, f, c̃ are dL/dC_t times
    theirs. And dC_dH = O_t (1 - tanh²(C_t)), the part of dL/dC_t that comes through H_t.
    """
    A = gates.to(Cs.dtype)  # O, I, F, S
    O, I, _, S = gate_views(A)
    dGates_dHC = torch.addcmul(A, A, A, value=-1)  # σ - σ² in every block: (steps, 4·hiddens, batch)
    d_o, d_i, d_f, d_c = gate_views(dGates_dHC)
    d_o.mul_(tanh_C)
    d_i.mul_(S * 2 - 1)  # C̃
    d_f.mul_(Cs[:-1])
    d_c.mul_(I).mul_(4)
    dC_dH = torch.addcmul(O, O * tanh_C, tanh_C, value=-1)  # O - O tanh²(C)
    return dGates_dHC, dC_dH


def backward_steps(
    dHs: torch.Tensor, dC_T: torch.Tensor | None, gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward through time, feature-major: dL/d(gate pre-activations)ᵀ of every step,
    (steps, 4·hiddens, batch) in the compute dtype, and dL/dC_0ᵀ. `dHs` (steps, hiddens, batch)
    is dL/dH_tᵀ from above (the outputs' gradient), `dC_T` dL/dC_T (batch, hiddens) or None,
    W_h the article's (hiddens, 4·hiddens).

        dL/dH_t = dHs[t] + dGates_{t+1} W_hᵀ             (transposed: W_h dGates_{t+1}ᵀ)
        dL/dC_t = dL/dC_{t+1} ⊙ F_{t+1} + dL/dH_t ⊙ dC_dH
    """
    dGates_dHC, dC_dH = local_derivatives(gates, Cs, tanh_C)
    steps, hiddens, batch = dC_dH.shape
    dGates = gates.new_empty(gates.shape)  # (steps, 4·hiddens, batch)
    dO = dGates[:, :hiddens].unbind(0)  # (hiddens, batch) per step
    dIFC = dGates[:, hiddens:].unflatten(1, (3, hiddens)).unbind(0)  # (3, hiddens, batch) per step
    dO_dH = dGates_dHC[:, :hiddens].unbind(0)
    dIFC_dC = dGates_dHC[:, hiddens:].unflatten(1, (3, hiddens)).unbind(0)
    dGates_, dHs_, F_, dC_dH_ = (x.unbind(0) for x in (dGates, dHs, gate_views(gates)[2], dC_dH))
    dH = dHs.new_empty((hiddens, batch))
    dC = Cs.new_zeros((hiddens, batch)) if dC_T is None else dC_T.T.to(Cs.dtype).clone(memory_format=torch.contiguous_format)
    for t in reversed(range(steps)):
        if t == steps - 1:
            dH_t = dHs_[t]
        else:
            dH_t = torch.addmm(dHs_[t], W_h, dGates_[t + 1], out=dH)  # from the output and from step t+1
            dC.mul_(F_[t + 1])  # through C_{t+1} = F_{t+1} ⊙ C_t + …
        dC.addcmul_(dH_t, dC_dH_[t])  # through H_t = O_t ⊙ tanh(C_t)
        torch.mul(dH_t, dO_dH[t], out=dO[t])
        torch.mul(dC.unsqueeze(0), dIFC_dC[t], out=dIFC[t])
    return dGates, dC.mul_(F_[0])


class Sequence(NamedTuple):
    """A layer's forward pass over a sequence: what backward through time needs."""

    gates: torch.Tensor  # (steps, 4·hiddens, batch): the activations O, I, F, S (C̃ = 2S - 1), compute dtype
    Hs: torch.Tensor  # (steps + 1, hiddens, batch): H_0ᵀ … H_Tᵀ, compute dtype (the next product's input)
    Cs: torch.Tensor  # (steps + 1, hiddens, batch): C_0ᵀ … C_Tᵀ, the parameters' dtype (fp32 under bf16)
    tanh_C: torch.Tensor  # (steps, hiddens, batch): tanh(C_1)ᵀ … tanh(C_T)ᵀ


def run_sequence(X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, state_dtype: torch.dtype) -> Sequence:
    """One layer over the whole sequence, outside autograd, feature-major.

    No autocast guard is needed: every product's operands are already in the compute dtype,
    and autocast leaves in-place and out= operations alone."""
    steps, batch, hiddens = X.shape[0], X.shape[1], weights.W_hT.shape[1]
    gates = input_projection(X, weights)  # (steps, 4·hiddens, batch)
    Hs = weights.W_hT.new_empty((steps + 1, hiddens, batch))
    Cs = C_0.new_empty((steps + 1, hiddens, batch), dtype=state_dtype)
    tanh_C = Cs.new_empty((steps, hiddens, batch))
    Hs[0].copy_(H_0.T)
    Cs[0].copy_(C_0.T)
    forward_steps(gates, Hs, Cs, tanh_C, weights.W_hT)
    return Sequence(gates, Hs, Cs, tanh_C)


class LSTMSequence(torch.autograd.Function):
    """One layer of the article's LSTM over a whole sequence, with a hand-written backward
    through time (as jcjohnson/torch-rnn for Torch): the gates' activations are kept in
    preallocated buffers, and each weight gradient is one large product over all steps
    instead of one small product per step.

    Inside, every per-step tensor is feature-major, (features, batch): a step's product is
    W_hᵀ (4·hiddens × hiddens) times H_{t-1}ᵀ (hiddens × batch), a shape BLAS runs about half
    again as fast at batch 32 as H_{t-1} W_h, and every gate is a contiguous block.

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
        return seq.Hs[1:].transpose(1, 2), seq.Cs[-1].T  # (steps, batch, hiddens), (batch, hiddens)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dHs: torch.Tensor | None, dC_T: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        X, gates, Hs, Cs, tanh_C, *W = ctx.saved_tensors
        X_dtype, H_0_dtype, C_0_dtype = ctx.input_dtypes
        needs = ctx.needs_input_grad
        dtype = Hs.dtype
        W_h = torch.cat(W[4:8], dim=1).to(dtype)  # (hiddens, 4·hiddens), the article's
        dHsT = Hs[1:].new_zeros(Hs[1:].shape) if dHs is None else dHs.transpose(1, 2).to(dtype).contiguous()
        dGates, dC_0 = backward_steps(dHsT, dC_T, gates, Cs, tanh_C, W_h)  # (steps, 4·hiddens, batch)
        dX = dH_0 = None
        if needs[0]:
            W_x = torch.cat(W[0:4], dim=1).to(dtype)  # (inputs, 4·hiddens)
            dX = torch.matmul(W_x, dGates).transpose(1, 2).to(X_dtype)  # (steps, batch, inputs)
        if needs[1]:
            dH_0 = (W_h @ dGates[0]).T.to(H_0_dtype)  # (batch, hiddens)
        dC_0 = dC_0.T.to(C_0_dtype) if needs[2] else None
        num_inputs = W[0].shape[0]
        param_grads = weight_gradients(X, Hs[:-1], dGates, num_inputs, Cs.dtype) if any(needs[4:]) else (None,) * 12
        return dX, dH_0, dC_0, None, *param_grads


def weight_gradients(
    X: torch.Tensor, H_prev: torch.Tensor, dGates: torch.Tensor, num_inputs: int, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """dW_h, dW_x and db summed over every step and batch row, split back into the twelve
    parameters' gradients (FAST_ORDER) in the parameters' dtype:

        dW_h = Σ_t H_{t-1}ᵀ dGates_t        dW_x = Σ_t X_tᵀ dGates_t        db = Σ_t 1ᵀ dGates_t

    All three are one product, dGatesᵀ [H_{t-1} | X_t | 1] over every step's rows side by side
    (b is the weight of a constant input 1), with X_t one-hot for ids. One large product runs
    faster than three, the thin ones (28 characters, one bias column) being inefficient alone.
    Under bf16 the product accumulates in fp32 and rounds once.
    """
    steps, hiddens, batch = H_prev.shape
    dG = dGates.permute(1, 0, 2).reshape(dGates.shape[1], -1)  # (4·hiddens, steps·batch), a copy
    R = dG.new_empty((steps * batch, hiddens + num_inputs + 1))  # rows [H_{t-1} | X_t | 1]
    R[:, :hiddens].view(steps, batch, hiddens).copy_(H_prev.transpose(1, 2))
    if X.is_floating_point():
        R[:, hiddens:-1].copy_(X.reshape(-1, num_inputs))
    else:
        R[:, hiddens:-1].zero_().scatter_(1, X.reshape(-1, 1).long(), 1.0)  # one-hot rows
    R[:, -1] = 1.0
    dW_hT, dW_xT, db = (dG @ R).to(dtype).split([hiddens, num_inputs, 1], dim=1)  # (4·hiddens, ·) each
    return (*(g.T for g in dW_xT.chunk(4)), *(g.T for g in dW_hT.chunk(4)), *db.squeeze(1).chunk(4))


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
        weight = self.layers[0].W_xi
        H_0, C_0 = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, weight)
        dtype = compute_dtype(weight)
        Hs, Cs = [], []
        for k, layer in enumerate(self.layers):
            if k > 0 and self.dropout > 0 and self.training:
                # contiguous first: the fast path's outputs are transposed views, and dropout
                # draws its mask in memory order; so both paths draw the same mask
                X = F.dropout(X.contiguous(), self.dropout, training=True)
            if self.fused:
                X, C = fast_layer(layer, X, H_0[k], C_0[k], dtype)
                H = X[-1]
            else:
                X, H, C = layer(X, H_0[k], C_0[k])
            Hs.append(H)
            Cs.append(C)
        C = torch.stack(Cs)  # (layers, batch, hiddens)
        return X, (as_dtype(torch.stack(Hs), C.dtype), C)


def fast_layer(layer: ScratchLSTMLayer, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer on the fast path: every step's H (steps, batch, hiddens) in `dtype`, and C_T."""
    weights = layer.stacked(dtype, ids=not X.is_floating_point())
    if torch.is_grad_enabled():
        return LSTMSequence.apply(X, H_0, C_0, weights, *layer.fast_params())
    seq = run_sequence(X, H_0, C_0, weights, layer.W_xi.dtype)  # without autograd: evaluation
    return seq.Hs[1:].transpose(1, 2), seq.Cs[-1].T


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
