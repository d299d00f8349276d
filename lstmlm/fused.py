"""The scratch LSTM's fast path: the same equations as `lstm.ScratchLSTMLayer`, computed for
speed, with a hand-written backward pass through time (as jcjohnson/torch-rnn does for Torch).
On a CPU the recurrence itself runs compiled (`native.py`, `csrc/recurrence.cpp`) where it can
be built; the Python loop here is the same arithmetic, and what runs elsewhere.

The layer's parameters are packed, as the fast path wants them: W_x (inputs, 4·hiddens), W_h
(hiddens, 4·hiddens) and b (4·hiddens), the four gates side by side in nn.LSTM's order
i, f, c̃, o (GATE_ORDER); the article's twelve matrices are views of them.

Per layer and sequence: the input projection of every step at once (for ids, columns picked
from a table: no product), then the recurrence in place on preallocated buffers,
feature-major — each step's tensors are transposed, (features, batch), so a step's product
W_hᵀ H_{t-1}ᵀ is one contiguous (4·hiddens × hiddens) matrix times a (hiddens × batch) one,
the shape BLAS runs fastest at batch 32, and every gate is a contiguous block — and in
backward the factors that do not depend on the recurrence for all steps at once, and each
weight gradient as one product over every step.

Precision: the products run in the compute dtype (bf16 under autocast: about twice as fast on
a CPU with AVX512-BF16), everything elementwise in the parameters' dtype (fp32), where it is
both exact enough and, per element, faster than bf16 on a CPU. So a step's gates are kept in
fp32, and H in both (fp32 for the next layer, the compute dtype as the next product's operand).

Memory per layer and sequence (steps T, batch B, hiddens H, in fp32 unless noted): the gates
4·T·H·B, C_0 … C_T (T+1)·H·B, tanh(C) T·H·B and H_0 … H_T (T+1)·H·B in the compute dtype —
about 7·T·H·B numbers, kept for backward — and in backward dGates 4·T·H·B (twice under bf16).

`tests/test_lstm.py` proves this path equal to the readable loop and to nn.LSTM, outputs and
every gradient, and gradchecks it in float64.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

GATE_ORDER = ("i", "f", "c", "o")  # the packed blocks: nn.LSTM's i, f, g (= c̃), o
_T = TypeVar("_T")
_P = TypeVar("_P")


def block(gate: str, hiddens: int) -> slice:
    """The columns (or rows, transposed) of `gate` in a packed (…, 4·hiddens) tensor."""
    k = GATE_ORDER.index(gate)
    return slice(k * hiddens, (k + 1) * hiddens)


class Stacked(NamedTuple):
    """A layer's weights for the fast path's forward, transposed for the feature-major
    products, the candidate's rows doubled; the products' operands in the compute dtype.

    Doubling them lets one sigmoid cover all four gates of a step, the candidate through
    tanh(x) = 2σ(2x) - 1: on a CPU a sigmoid costs a sixth of a tanh, and one operation over a
    step's whole (4·hiddens, batch) gates costs less than three.
    """

    W_hT: torch.Tensor  # (4·hiddens, hiddens), contiguous, compute dtype
    W_xT: torch.Tensor | None  # (4·hiddens, inputs), compute dtype, for dense inputs; None for ids
    b: torch.Tensor  # (4·hiddens,), the parameters' dtype
    table: torch.Tensor | None  # (4·hiddens, inputs): (W_x + b)ᵀ, the parameters' dtype, whose columns ids pick; None for dense


def stack_weights(W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ids: bool) -> Stacked:
    """The packed parameters as `Stacked` forward weights, outside autograd: the fast path's
    Function routes the gradients back to the parameters itself. Doubling is exact."""
    with torch.no_grad():
        c = block("c", W_h.shape[0])
        W_hT = transposed(W_h, dtype)
        W_hT[c] *= 2
        b2 = b.clone()
        b2[c] *= 2
        if ids:
            table = (W_x + b).T.contiguous()  # (4·hiddens, inputs): b added in the parameters' dtype
            table[c] *= 2
            return Stacked(W_hT, None, b2, table)
        W_xT = transposed(W_x, dtype)
        W_xT[c] *= 2
        return Stacked(W_hT, W_xT, b2, None)


def transposed(W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Wᵀ as a fresh contiguous matrix in `dtype`: BLAS multiplies a transposed view about half
    as fast at these shapes."""
    out = torch.empty((W.shape[1], W.shape[0]), dtype=dtype, device=W.device)
    return out.copy_(W.T)


@functools.lru_cache(maxsize=1)
def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's linear (X Wᵀ), where this torch build has it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return cast(Callable[..., torch.Tensor], torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return None


def times_T(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A Bᵀ. On a CPU in fp32 through oneDNN's linear where torch has it: torch.mm takes MKL's
    fp32 GEMM, which on AMD CPUs runs an AVX2 kernel at about half oneDNN's rate (the library
    nn.LSTM's CPU kernel is built on). bf16 products are oneDNN's in torch.mm already."""
    linear = _onednn_linear() if A.dtype == torch.float32 and A.device.type == "cpu" else None
    return linear(A, B, None, "none", [], "") if linear is not None else A @ B.T


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
    """(X_t W_x + b)ᵀ for every step of dense input at once: (steps, 4·hiddens, batch), fresh
    and contiguous, in the parameters' dtype — one batched product. X is then usually a fast
    layer's output, a transposed view of its (steps, hiddens, batch) buffer, so Xᵀ is free.
    (For ids, forward_steps picks each step's columns from the table as the step begins.)"""
    assert weights.W_xT is not None  # Stacked holds W_xT for dense input
    XT = X.transpose(1, 2).to(weights.W_xT.dtype)  # (steps, inputs, batch)
    return torch.matmul(weights.W_xT, XT).to(weights.b.dtype).add_(weights.b[:, None])


def gate_views(gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four (steps, hiddens, batch) blocks of feature-major gates (GATE_ORDER), as views."""
    return tuple(gates.unflatten(1, (4, -1)).unbind(1))


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


class CellInPlace:
    """The elementwise half of a layer's step, batch-major, in place on buffers given once:
    generation's unit of work, where each operation at batch 1 is shorter than creating a
    tensor (or even a view), so `step` creates nothing.

    `gates` (batch, 4·hiddens) is to hold the pre-activations X_t W_x + H_{t-1} W_h + b in
    GATE_ORDER, the candidate doubled (see Stacked); `step` turns them into I_t, F_t, S_t,
    O_t, takes C (batch, hiddens) from C_{t-1} to C_t and writes H_t into H. The arithmetic is
    in C's dtype (fp32): gates in another dtype (bf16 products) are first copied into a buffer
    of C's. Any of them may be views.
    """

    def __init__(self, gates: torch.Tensor, C: torch.Tensor, H: torch.Tensor) -> None:
        self.gates, self.C, self.H = gates, C, H
        self.work = gates if gates.dtype == C.dtype else torch.empty(gates.shape, dtype=C.dtype, device=C.device)
        self.I, self.F, self.S, self.O = self.work.chunk(4, dim=1)
        self.tanh_C = torch.empty_like(C)

    def step(self) -> None:
        if self.work is not self.gates:
            self.work.copy_(self.gates)
        self.work.sigmoid_()
        # C_t = F_t ⊙ C_{t-1} + I_t ⊙ (2 S_t - 1)
        self.C.mul_(self.F).addcmul_(self.I, self.S, value=2).sub_(self.I)
        if self.C.shape[0] == 1:  # a row of a few hundred numbers: one tanh costs less than four cheap operations
            torch.tanh(self.C, out=self.tanh_C)
        else:
            tanh_by_sigmoid(self.C, out=self.tanh_C)
        torch.mul(self.O, self.tanh_C, out=self.H)  # H_t = O_t ⊙ tanh(C_t)


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


def compiled(gates: torch.Tensor, W: torch.Tensor) -> Any | None:
    """`native`'s compiled recurrence, where it computes what the Python loop would: on a CPU,
    the gates and cell in fp32, the products in fp32 or bf16."""
    if gates.device.type != "cpu" or gates.dtype != torch.float32 or W.dtype not in (torch.float32, torch.bfloat16):
        return None
    return native.recurrence()


def recurrence_backward(
    dHs: torch.Tensor, dC_T: torch.Tensor | None, gates: torch.Tensor, Cs: torch.Tensor, tanh_C: torch.Tensor, W_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`backward_steps`, compiled where `native` has it for this CPU."""
    ops = compiled(gates, W_h)
    if ops is None:
        return backward_steps(dHs, dC_T, gates, Cs, tanh_C, W_h)
    dGates, dGates_c, dC_0 = ops.backward(dHs, dC_T, gates, Cs, tanh_C, W_h, torch.get_num_threads())
    return dGates, dGates_c, dC_0


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
    ifc, o = slice(0, 3 * hiddens), block("o", hiddens)  # the gates that take dL/dC, side by side; o
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
    """One layer over the whole sequence, outside autograd, feature-major: compiled where
    `native` has the recurrence for this CPU, else the Python loop `forward_steps`.

    No autocast guard is needed: every product's operands are already in the compute dtype,
    and autocast leaves in-place and out= operations alone."""
    ops = compiled(weights.b, weights.W_hT) if state_dtype == torch.float32 else None
    if ops is not None:
        threads = torch.get_num_threads()
        if weights.table is not None:
            return Sequence(*ops.forward(weights.table, X.long().contiguous(), None, None, None, weights.W_hT, H_0, C_0, threads))
        assert weights.W_xT is not None  # Stacked holds W_xT for dense input
        XT = X.transpose(1, 2).to(weights.W_xT.dtype).contiguous()  # (steps, inputs, batch): free for a fast layer's output
        return Sequence(*ops.forward(None, None, XT, weights.W_xT, weights.b, weights.W_hT, H_0, C_0, threads))
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


# ---- the batch across the cores --------------------------------------------------------------
#
# At batch 32 a step's elementwise work (8,192 numbers a gate) is below the size at which torch
# spreads an operation over threads, and a step's product is small enough that two threads
# share it poorly. Rows of a batch are independent sequences, though, so the batch is cut into
# one part per core and each part runs the whole recurrence, forward or backward, on a thread
# of its own with one torch thread: nothing is shared until the sequence ends. The parts' weight
# gradients are summed; everything else is concatenated. This is the Python loop's way to use
# the cores, and it pays little: each part's loop holds the GIL between its operations. The
# compiled recurrence (native.py) takes the batch whole and cuts each step by hidden units.

MIN_PART_ROWS = 8  # a part of fewer rows runs its products too inefficiently to pay


class _Pool:
    """Worker threads, each set to one torch thread once, made on first use."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.size = 0

    def get(self, size: int) -> ThreadPoolExecutor:
        if self.executor is None or self.size != size:
            if self.executor is not None:
                self.executor.shutdown(wait=False)
            self.executor = ThreadPoolExecutor(size, thread_name_prefix="lstmlm-part", initializer=torch.set_num_threads, initargs=(1,))
            self.size = size
        return self.executor


_POOL = _Pool()
_FORCED_PARTS: int | None = None  # tests set it (`split_batch`) to exercise the split on any machine


@contextlib.contextmanager
def split_batch(parts: int | None) -> Iterator[None]:
    """Within the block, cut every batch into `parts` parts (1: never; None: by the cores)."""
    global _FORCED_PARTS
    previous, _FORCED_PARTS = _FORCED_PARTS, parts
    try:
        yield
    finally:
        _FORCED_PARTS = previous


def batch_parts(batch: int, device: torch.device) -> list[slice]:
    """The rows each part runs: one part per torch thread on a CPU, when each gets enough rows;
    one where the recurrence is compiled, which cuts each step by hidden units instead."""
    parts = _FORCED_PARTS
    if parts is None:
        parts = torch.get_num_threads() if device.type == "cpu" and native.recurrence() is None else 1
    parts = max(1, min(parts, batch // MIN_PART_ROWS if _FORCED_PARTS is None else batch))
    bounds = [round(k * batch / parts) for k in range(parts + 1)]
    return [slice(a, z) for a, z in itertools.pairwise(bounds)]


def in_parts(parts: list[_P], work: Callable[[_P], _T]) -> list[_T]:
    """`work(part)` for every part: on the calling thread for one part, else on one worker each,
    without autograd (which is per thread; the fast path's Function does its own)."""
    if len(parts) == 1:
        return [work(parts[0])]

    def unrecorded(part: _P) -> _T:
        with torch.no_grad():
            return work(part)

    return list(_POOL.get(len(parts)).map(unrecorded, parts))


class LSTMSequence(torch.autograd.Function):
    """One layer of the article's LSTM over a whole sequence, with a hand-written backward
    through time: the gates' activations are kept in preallocated buffers, and each weight
    gradient is one large product over all steps instead of one small product per step.

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
        parts = batch_parts(X.shape[1], X.device)
        seqs = in_parts(parts, lambda rows: run_sequence(X[:, rows], H_0[rows], C_0[rows], weights, W_h.dtype))
        # Saved through autograd, so an in-place change of the outputs (views of the parts' H)
        # before backward is an error rather than a silently wrong gradient.
        ctx.save_for_backward(X, W_x, W_h, *(t for seq in seqs for t in seq))
        ctx.parts = parts
        ctx.input_dtypes = (X.dtype, H_0.dtype, C_0.dtype)
        if len(seqs) == 1:
            return seqs[0].Hs[1:].transpose(1, 2), seqs[0].Cs[-1].T  # (steps, batch, hiddens), (batch, hiddens)
        outputs = torch.cat([seq.Hs[1:] for seq in seqs], dim=2).transpose(1, 2)
        return outputs, torch.cat([seq.Cs[-1] for seq in seqs], dim=1).T

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dHs: torch.Tensor | None, dC_T: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        X, W_x, W_h, *saved = ctx.saved_tensors
        seqs = [Sequence(*saved[k : k + 4]) for k in range(0, len(saved), 4)]
        dtype = seqs[0].Hs.dtype  # the products'
        W_h_ = as_dtype(W_h, dtype)  # (hiddens, 4·hiddens): contiguous, as the parameter is stored
        W_x_ = as_dtype(W_x, dtype)
        need_weights = any(ctx.needs_input_grad[4:])

        def part(k: int) -> tuple[torch.Tensor | None, ...]:
            rows, seq = ctx.parts[k], seqs[k]
            return backward_part(X[:, rows], seq, None if dHs is None else dHs[:, rows], None if dC_T is None else dC_T[rows],
                                 W_x_, W_h_, ctx.needs_input_grad, need_weights, ctx.input_dtypes)  # fmt: skip

        results = in_parts(list(range(len(seqs))), part)
        dX, dH_0, dC_0 = (_joined([r[i] for r in results], dim) for i, dim in ((0, 1), (1, 0), (2, 0)))
        dW_x, dW_h, db = (_summed([r[i] for r in results]) for i in (3, 4, 5))
        return dX, dH_0, dC_0, None, dW_x, dW_h, db


def _joined(parts: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    """The parts' gradients of batch rows, side by side again."""
    tensors = [p for p in parts if p is not None]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim) if tensors else None


def _summed(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The parts' shares of a weight gradient, added up."""
    tensors = [p for p in parts if p is not None]
    return sum(tensors[1:], tensors[0]) if tensors else None


def backward_part(
    X: torch.Tensor,
    seq: Sequence,
    dHs: torch.Tensor | None,
    dC_T: torch.Tensor | None,
    W_x: torch.Tensor,
    W_h: torch.Tensor,
    needs: tuple[bool, ...],
    need_weights: bool,
    input_dtypes: tuple[torch.dtype, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Backward through one part's rows: dX, dH_0, dC_0 and its share of dW_x, dW_h, db."""
    X_dtype, H_0_dtype, C_0_dtype = input_dtypes
    gates = seq.gates
    dHsT = gates.new_zeros(seq.Hs[1:].shape) if dHs is None else dHs.transpose(1, 2).to(gates.dtype).contiguous()
    dGates, dGates_c, dC_0 = recurrence_backward(dHsT, dC_T, gates, seq.Cs, seq.tanh_C, W_h)  # (4·hiddens, steps, batch)
    _, steps, batch = dGates.shape
    dX = dH_0 = None
    if needs[0]:
        dX = times_T(dGates_c.view(-1, steps * batch).T, W_x).view(steps, batch, -1).to(X_dtype)  # (steps, batch, inputs)
    if needs[1]:
        dH_0 = (W_h @ dGates_c[:, 0]).T.to(H_0_dtype)  # (batch, hiddens)
    dC_0_grad = dC_0.T.to(C_0_dtype) if needs[2] else None
    grads = weight_gradients(X, seq.Hs[:-1], dGates, dGates_c, W_x.shape[0]) if need_weights else (None, None, None)
    return dX, dH_0, dC_0_grad, *grads


def weight_gradients(
    X: torch.Tensor, H_prev: torch.Tensor, dGates: torch.Tensor, dGates_c: torch.Tensor, num_inputs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dW_x, dW_h and db summed over every step and batch row, in the packed parameters' layout
    and the gates' dtype:

        dW_h = Σ_t H_{t-1}ᵀ dGates_t        dW_x = Σ_t X_tᵀ dGates_t        db = Σ_t 1ᵀ dGates_t

    dW_h and dW_x are one product each over every step's columns side by side: dGates comes as
    (4·hiddens, steps, batch), so BLAS sees one long inner dimension. For ids, X_t is one-hot:
    a thin product. Under bf16 the products take the bf16 copy of dGates, accumulate in fp32
    and round once; db sums the fp32 ones.
    """
    gates, steps, batch = dGates.shape
    dtype = dGates.dtype
    dG = dGates_c.view(gates, steps * batch)  # (4·hiddens, steps·batch): a view
    Hp = H_prev.permute(1, 0, 2).reshape(-1, steps * batch)  # (hiddens, steps·batch), a copy
    dW_h = times_T(Hp, dG).to(dtype)  # (hiddens, 4·hiddens)
    if X.is_floating_point():
        Xf = X.permute(2, 0, 1).reshape(num_inputs, steps * batch).to(dG.dtype)  # (inputs, steps·batch)
    else:
        Xf = F.one_hot(X.reshape(-1), num_inputs).T.to(dG.dtype)  # (inputs, steps·batch), one-hot columns
    dW_x = times_T(Xf, dG).to(dtype)  # (inputs, 4·hiddens)
    db = dGates.sum(dim=(1, 2))
    return dW_x, dW_h, db
