"""The scratch LSTM's fast path: the same equations as `lstm.ScratchLSTMLayer`, computed for
speed, with a hand-written backward pass through time (as jcjohnson/torch-rnn does for Torch).

Per layer and sequence: the input projection of every step at once (a gather for ids), then
the recurrence in place on preallocated buffers, feature-major — each step's tensors are
transposed, (features, batch), so a step's product W_hᵀ H_{t-1}ᵀ runs at the shape BLAS runs
fastest at batch 32 and every gate is a contiguous block — and in backward the factors that
do not depend on the recurrence for all steps at once, the weight gradients as one product.

Memory per layer and sequence (steps T, batch B, hiddens H, in the compute dtype unless
noted): the gates 4·T·H·B, H_0 … H_T (T+1)·H·B, C_0 … C_T (T+1)·H·B and tanh(C) T·H·B in
the parameters' dtype — 7·T·H·B numbers, kept for backward — and in backward dGates 4·T·H·B.

`tests/test_lstm.py` proves this path equal to the readable loop and to nn.LSTM, outputs and
every gradient, and gradchecks it in float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

# The fast path's gate order: o first, so in backward the gates that take dL/dC (i, f, c̃) are
# side by side; the candidate last.
FAST_ORDER = ("o", "i", "f", "c")


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


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without the microseconds a no-op `.to` still costs."""
    return x if x.dtype == dtype else x.to(dtype)


def input_projection(X: torch.Tensor, weights: Stacked) -> torch.Tensor:
    """(X_t W_x + b)ᵀ for every step at once: (steps, 4·hiddens, batch), fresh and contiguous.

    For ids, a gather straight into that layout (gathering rows, then transposing them, costs
    four times as much here). For dense input, one batched product: X is then usually a fast
    layer's output, a transposed view of its (steps, hiddens, batch) buffer, so Xᵀ is free."""
    steps = X.shape[0]
    if weights.W_xb is not None:  # gates[t, g, b] = (W_x + b)[X[t, b], g], gathered in place
        W_xbT = weights.W_xb.T.expand(steps, -1, -1)  # (steps, 4·hiddens, inputs), no copy
        return torch.gather(W_xbT, 2, X[:, None, :].long().expand(-1, W_xbT.shape[1], -1))
    assert weights.W_xT is not None  # Stacked holds W_xT exactly when W_xb is None
    XT = X.transpose(1, 2).to(weights.W_hT.dtype)  # (steps, inputs, batch)
    return torch.matmul(weights.W_xT, XT).add_(weights.b[:, None])


def gate_views(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four (steps, hiddens, batch) blocks of feature-major gates (FAST_ORDER), as views."""
    return tuple(gates.unflatten(1, (4, -1)).unbind(1))


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
    def forward(
        ctx: Any, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        dC_0_grad = dC_0.T.to(C_0_dtype) if needs[2] else None
        num_inputs = W[0].shape[0]
        param_grads = weight_gradients(X, Hs[:-1], dGates, num_inputs, Cs.dtype) if any(needs[4:]) else (None,) * 12
        return dX, dH_0, dC_0_grad, None, *param_grads


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
