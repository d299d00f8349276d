"""The LSTM's Python fast path (the `fused` path of `recurrence.py`): the same equations as
`cells/lstm.py`, computed for speed, with a hand-written backward pass through time (as
jcjohnson/torch-rnn does for Torch). It is what the scratch LSTM runs on a GPU — where the
trainer may record the whole step as one CUDA graph — and on a CPU that cannot build the
compiled recurrence.

The layer's parameters are packed, as the fast path wants them: W_x (inputs, 4·hiddens), W_h
(hiddens, 4·hiddens) and b (4·hiddens), the four gates side by side in nn.LSTM's order
i, f, c̃, o; the article's twelve matrices are views of them. The candidate's rows come
doubled (`cells.lstm.LSTM.prepared`), so one sigmoid covers the four gates: C̃ = 2S - 1.

Per layer and sequence: the input projection of every step at once (for ids, columns picked
from a table: no product), then the recurrence in place on preallocated buffers,
feature-major — each step's tensors are transposed, (features, batch), so a step's product
W_hᵀ H_{t-1}ᵀ is one contiguous (4·hiddens × hiddens) matrix times a (hiddens × batch) one,
the shape BLAS runs fastest at batch 32, and every gate is a contiguous block — and in
backward the factors that do not depend on the recurrence for all steps at once, and each
weight gradient as one product over every step.

Precision: the products run in the compute dtype (bf16 under autocast), everything elementwise
in the parameters' dtype (fp32). So a step's gates are kept in fp32, and H in both (fp32 for
the next layer, the compute dtype as the next product's operand).

Memory per layer and sequence (steps T, batch B, hiddens H, in fp32 unless noted): the gates
4·T·H·B, C_0 … C_T (T+1)·H·B, tanh(C) T·H·B and H_0 … H_T (T+1)·H·B in the compute dtype —
about 7·T·H·B numbers, kept for backward — and in backward dGates 4·T·H·B (twice under bf16).

`tests/test_cells.py` proves this path equal to the readable loop and to nn.LSTM, outputs and
every gradient, and gradchecks it in float64.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
from torch.autograd.function import once_differentiable

from .cells.base import Stacked, State
from .recurrence import as_dtype, times_T, weight_gradients

if TYPE_CHECKING:
    from .cells.cores import ScratchLayer


def gate_views(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four (steps, hiddens, batch) blocks of feature-major gates (i, f, c̃, o), as views."""
    return tuple(gates.unflatten(1, (4, -1)).unbind(1))


def input_projection(X: torch.Tensor, weights: Stacked) -> torch.Tensor:
    """(X_t W_x + b)ᵀ for every step of dense input at once: (steps, 4·hiddens, batch), fresh
    and contiguous, in the parameters' dtype — one batched product. X is then usually a fast
    layer's output, a transposed view of its (steps, hiddens, batch) buffer, so Xᵀ is free.
    (For ids, forward_steps picks each step's columns from the table as the step begins.)"""
    assert weights.W_xT is not None  # Stacked holds W_xT for dense input
    XT = X.transpose(1, 2).to(weights.W_xT.dtype)  # (steps, inputs, batch)
    return torch.matmul(weights.W_xT, XT).to(weights.b.dtype).add_(weights.b[:, None])


def tanh_by_sigmoid(C: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """tanh(C) = 2σ(2C) - 1 into `out`: four cheap operations, together a third of one tanh here."""
    return torch.mul(C, 2, out=out).sigmoid_().mul_(2).sub_(1)


def forward_steps(
    gates: torch.Tensor, Hs: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_hT: torch.Tensor, picks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> None:
    """The recurrence, in place and feature-major (every per-step tensor transposed): `gates`
    (steps, 4·hiddens, batch) holds (X_t W_x + b)ᵀ on entry — or, for ids, `picks` = (table,
    X) and step t's columns are picked from the table as it begins (a small copy per step
    costs a tenth of moving the whole sequence's picks into this layout) — and I, F, S, O on
    exit, where S = σ(2·c̃'s pre-activation), so C̃ = 2S - 1; Hs[t + 1], Cs[t + 1] (hiddens,
    batch) and tanh_C[t] receive H_tᵀ, C_tᵀ and tanh(C_t)ᵀ. `W_hT` is Stacked's; Hs is in its
    dtype, gates, Cs and tanh_C in the parameters'.

    Every view is made before the loop and every result written into a preallocated buffer:
    at batch 32 a step's arithmetic takes a few microseconds, as long as creating a tensor does.
    """
    pre = gates.unbind(0)  # (4·hiddens, batch) per step
    I, F_, S, O = (g.unbind(0) for g in gate_views(gates))  # (hiddens, batch) per step, contiguous
    H, C, tanh_C_ = Hs.unbind(0), Cs.unbind(0), tanh_C.unbind(0)
    mixed = W_hT.dtype != gates.dtype
    product = gates.new_empty(gates.shape[1:], dtype=W_hT.dtype) if mixed else None
    table, ids = picks if picks is not None else (None, None)
    for t in range(len(pre)):
        if table is not None:
            torch.index_select(table, 1, ids[t], out=pre[t])  # type: ignore[index]  # X_t W_x + b, transposed
        if product is None:
            pre[t].addmm_(W_hT, H[t])  # + (H_{t-1} W_h)ᵀ = W_hᵀ H_{t-1}ᵀ: the four gates in one product
        else:
            pre[t].add_(torch.mm(W_hT, H[t], out=product))  # the product in bf16, the sum in fp32
        pre[t].sigmoid_()  # I_t, F_t, O_t, and S_t with C̃_t = 2 S_t - 1
        # C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t = F_t ⊙ C_{t-1} + 2 I_t ⊙ S_t - I_t
        torch.mul(F_[t], C[t], out=C[t + 1]).addcmul_(I[t], S[t], value=2).sub_(I[t])
        tanh_by_sigmoid(C[t + 1], out=tanh_C_[t])
        torch.mul(O[t], tanh_C_[t], out=H[t + 1])  # H_t = O_t ⊙ tanh(C_t)


def local_derivatives(gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the backward pass that do not depend on the recurrence, for every step
    at once (few large operations instead of many small ones), in the gates' dtype.

    dGates_dHC (steps, 4·hiddens, batch), with σ' = σ (1 - σ) written in terms of the gate's
    value and C̃ = 2S - 1, so 1 - C̃² = 4 S (1 - S):

        i: C̃_t σ'(i)    f: C_{t-1} σ'(f)    c̃: I_t (1 - C̃_t²)    o: tanh(C_t) σ'(o)

    dL/d(o's pre-activation) is dL/dH_t times its o block; those of i, f, c̃ are dL/dC_t times
    theirs. And dC_dH = O_t (1 - tanh²(C_t)), the part of dL/dC_t that comes through H_t.
    """
    I, _, S, O = gate_views(gates)
    dGates_dHC = torch.addcmul(gates, gates, gates, value=-1)  # σ - σ² in every block: (steps, 4·hiddens, batch)
    d_i, d_f, d_c, d_o = gate_views(dGates_dHC)
    d_i.mul_(S * 2 - 1)  # C̃
    d_f.mul_(Cs[:-1])
    d_c.mul_(I).mul_(4)
    d_o.mul_(tanh_C)
    dC_dH = torch.addcmul(O, O * tanh_C, tanh_C, value=-1)  # O - O tanh²(C)
    return dGates_dHC, dC_dH


def backward_steps(
    dHs: torch.Tensor, dC_T: torch.Tensor | None, gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through time, feature-major: dL/d(gate pre-activations)ᵀ of every step as
    (4·hiddens, steps, batch) — the layout in which the weight gradients' products read every
    step's columns side by side without a copy — in the gates' dtype and again in W_h's (the
    products' operand; the same tensor when they agree), and dL/dC_0ᵀ. `dHs` (steps, hiddens, batch) is dL/dH_tᵀ
    from above (the outputs' gradient), `dC_T` dL/dC_T (batch, hiddens) or None, W_h the packed
    (hiddens, 4·hiddens), contiguous, in the compute dtype.

        dL/dH_t = dHs[t] + dGates_{t+1} W_hᵀ             (transposed: W_h dGates_{t+1}ᵀ)
        dL/dC_t = dL/dC_{t+1} ⊙ F_{t+1} + dL/dH_t ⊙ dC_dH
    """
    dGates_dHC, dC_dH = local_derivatives(gates, Cs, tanh_C)
    steps, hiddens, batch = dC_dH.shape
    ifc, o = slice(0, 3 * hiddens), slice(3 * hiddens, 4 * hiddens)  # the gates that take dL/dC, side by side; o
    dGates = gates.new_empty((4 * hiddens, steps, batch))
    mixed = W_h.dtype != gates.dtype
    dGates_c = dGates.new_empty(dGates.shape, dtype=W_h.dtype) if mixed else dGates  # the products' copy
    product = dHs.new_empty((hiddens, batch), dtype=W_h.dtype) if mixed else None
    dO = dGates[o].unbind(1)  # (hiddens, batch) per step
    dIFC = dGates[ifc].unflatten(0, (3, hiddens)).unbind(2)  # (3, hiddens, batch) per step
    dO_dH = dGates_dHC[:, o].unbind(0)
    dIFC_dC = dGates_dHC[:, ifc].unflatten(1, (3, hiddens)).unbind(0)
    dG, dG_c = dGates.unbind(1), dGates_c.unbind(1)  # (4·hiddens, batch) per step
    dHs_, F_, dC_dH_ = (x.unbind(0) for x in (dHs, gate_views(gates)[1], dC_dH))
    dH = dHs.new_empty((hiddens, batch))
    dC = Cs.new_zeros((hiddens, batch)) if dC_T is None else dC_T.T.to(Cs.dtype).clone(memory_format=torch.contiguous_format)
    for t in reversed(range(steps)):
        if t == steps - 1:
            dH_t = dHs_[t]
        else:
            if product is None:
                dH_t = torch.addmm(dHs_[t], W_h, dG_c[t + 1], out=dH)  # from the output and from step t+1
            else:
                dH_t = torch.add(dHs_[t], torch.mm(W_h, dG_c[t + 1], out=product), out=dH)
            dC.mul_(F_[t + 1])  # through C_{t+1} = F_{t+1} ⊙ C_t + …
        dC.addcmul_(dH_t, dC_dH_[t])  # through H_t = O_t ⊙ tanh(C_t)
        torch.mul(dH_t, dO_dH[t], out=dO[t])
        torch.mul(dIFC_dC[t], dC, out=dIFC[t])
        if mixed:
            dG_c[t].copy_(dG[t])
    return dGates, dGates_c, dC.mul_(F_[0])


class Sequence(NamedTuple):
    """A layer's forward pass over a sequence: what backward through time needs."""

    gates: torch.Tensor  # (steps, 4·hiddens, batch): the activations I, F, S, O (C̃ = 2S - 1), the parameters' dtype
    Hs: torch.Tensor  # (steps + 1, hiddens, batch): H_0ᵀ … H_Tᵀ, compute dtype (the next product's input)
    Cs: torch.Tensor  # (steps + 1, hiddens, batch): C_0ᵀ … C_Tᵀ, the parameters' dtype
    tanh_C: torch.Tensor  # (steps, hiddens, batch): tanh(C_1)ᵀ … tanh(C_T)ᵀ


def run_sequence(X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, state_dtype: torch.dtype) -> Sequence:
    """One layer over the whole sequence, outside autograd, feature-major.

    No autocast guard is needed: every product's operands are already in the compute dtype,
    and autocast leaves in-place and out= operations alone."""
    steps, batch, hiddens = X.shape[0], X.shape[1], weights.W_hT.shape[1]
    if weights.table is not None:  # ids: each step picks its columns
        gates = weights.table.new_empty((steps, 4 * hiddens, batch))
        picks = (weights.table, X.contiguous())
    else:
        gates, picks = input_projection(X, weights), None  # (steps, 4·hiddens, batch), state dtype
    Hs = weights.W_hT.new_empty((steps + 1, hiddens, batch))
    Cs = C_0.new_empty((steps + 1, hiddens, batch), dtype=state_dtype)
    tanh_C = Cs.new_empty((steps, hiddens, batch))
    Hs[0].copy_(H_0.T)
    Cs[0].copy_(C_0.T)
    forward_steps(gates, Hs, Cs, tanh_C, weights.W_hT, picks)
    return Sequence(gates, Hs, Cs, tanh_C)


def run_layer(layer: ScratchLayer, X: torch.Tensor, state: State, dtype: torch.dtype, W_h: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One LSTM layer by the fused path: every step's H (steps, batch, hiddens) in `dtype`, and
    the final (H, C). `W_h`, when given, runs in the parameter's place (DropConnect's W_h ⊙ M):
    the gradient for it reaches the parameter through the product with M, by autograd."""
    H_0, C_0 = state
    weights = layer.stacked(dtype, ids=not X.is_floating_point(), W_h=W_h)
    if torch.is_grad_enabled():
        outputs, C_T = cast(tuple[torch.Tensor, torch.Tensor], FusedLSTM.apply(X, H_0, C_0, weights, layer.W_x, W_h, layer.b))
    else:  # evaluation, generation's warm-up
        seq = run_sequence(X, H_0, C_0, weights, W_h.dtype)
        outputs, C_T = seq.Hs[1:].transpose(1, 2), seq.Cs[-1].T
    return outputs, (outputs[-1], C_T)


class FusedLSTM(torch.autograd.Function):
    """One LSTM layer over a whole sequence, with a hand-written backward through time: the
    gates' activations are kept in preallocated buffers, and each weight gradient is one large
    product over all steps instead of one small product per step.

    Inputs: X (steps, batch) ids or (steps, batch, inputs) floats, H_0 and C_0 (batch, hiddens),
    the layer's `Stacked` weights, then the packed parameters W_x, W_h, b themselves, which
    autograd routes the gradients to.
    Outputs: H_1 … H_T (steps, batch, hiddens) in the compute dtype and C_T in the parameters'.
    """

    @staticmethod
    def forward(
        ctx: Any, X: torch.Tensor, H_0: torch.Tensor, C_0: torch.Tensor, weights: Stacked, W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused C_T needs no zero gradient
        seq = run_sequence(X, H_0, C_0, weights, W_h.dtype)
        # Saved through autograd, so an in-place change of the outputs (views of H) before
        # backward is an error rather than a silently wrong gradient.
        ctx.save_for_backward(X, W_x, W_h, *seq)
        ctx.input_dtypes = (X.dtype, H_0.dtype, C_0.dtype)
        return seq.Hs[1:].transpose(1, 2), seq.Cs[-1].T  # (steps, batch, hiddens), (batch, hiddens)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dHs: torch.Tensor | None, dC_T: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        X, W_x, W_h, *saved = ctx.saved_tensors
        seq = Sequence(*saved)
        X_dtype, H_0_dtype, C_0_dtype = ctx.input_dtypes
        dtype = seq.Hs.dtype  # the products'
        W_h_ = as_dtype(W_h, dtype)  # (hiddens, 4·hiddens): contiguous, as the parameter is stored
        gates = seq.gates
        dHsT = gates.new_zeros(seq.Hs[1:].shape) if dHs is None else dHs.transpose(1, 2).to(gates.dtype).contiguous()
        dGates, dGates_c, dC_0 = backward_steps(dHsT, dC_T, gates, seq.Cs, seq.tanh_C, W_h_)  # (4·hiddens, steps, batch)
        _, steps, batch = dGates.shape
        needs = ctx.needs_input_grad
        dX = dH_0 = dC_0_grad = dW_x = dW_h = db = None
        if needs[0]:
            dX = times_T(dGates_c.view(-1, steps * batch).T, as_dtype(W_x, dtype)).view(steps, batch, -1).to(X_dtype)  # (steps, batch, inputs)
        if needs[1]:
            dH_0 = (W_h_ @ dGates_c[:, 0]).T.to(H_0_dtype)  # (batch, hiddens)
        if needs[2]:
            dC_0_grad = dC_0.T.to(C_0_dtype)
        if any(needs[4:]):
            dW_x, dW_h = (g.to(gates.dtype) for g in weight_gradients(X, seq.Hs[:-1], dGates_c, dGates_c, W_x.shape[0]))
            db = dGates.sum(dim=(1, 2))
        return dX, dH_0, dC_0_grad, None, dW_x, dW_h, db
