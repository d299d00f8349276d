"""How a scratch core runs its recurrence: one path, chosen once when the core is built, and
dispatched here.

    loop      the cell's equations one step at a time, differentiated by autograd: the readable
              reference, on any device, for any cell
    fused     the LSTM's Python fast path (`fused.py`): preallocated buffers and a hand-written
              backward through time; what runs on a GPU, where the trainer may also record the
              whole step as a CUDA graph (`graphs.py`, reported as the path `graph`)
    compiled  the cell's kernel in C++ (`native.py`, `csrc/recurrence.cpp`): one call per layer
              and sequence, cut by hidden units across the cores; on a CPU

`auto` takes `compiled` on a CPU where the cell has a kernel and the recurrence can be built,
else `fused` where the cell has one, else `loop`; a path asked for that cannot run here falls
back the same way, and `Choice.why` says why.

The compiled path's backward, like the fused one's, computes each weight gradient as one
product over every step: dW_h = Σ_t H_{t-1}ᵀ dA_t, dW_x = Σ_t X_tᵀ dA_t, db = Σ_t 1ᵀ dA_t, where
dA_t is the gradient of the step's pre-activations (what reaches W_h can differ from what reaches
W_x: the GRU's candidate reads its recurrent term through the reset gate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.autograd.function import once_differentiable

from . import native
from .cells.base import Cell, Stacked, State
from .errors import ShapeError

if TYPE_CHECKING:
    from .cells.cores import ScratchLayer


@dataclass(frozen=True)
class Choice:
    path: str  # loop, fused or compiled (a CUDA graph is the trainer's, on top of fused)
    why: str = ""  # why not the path asked for, where it could not be


def available(cell: Cell, device: torch.device, build: bool = True, dtype: torch.dtype = torch.float32) -> list[str]:
    """The paths `cell` can run on `device` with parameters in `dtype`, fastest first. Without
    `build`, `compiled` counts where a compiler could build it (training builds it later,
    saying so: `settle`)."""
    paths = []
    if device.type == "cpu" and dtype == torch.float32 and cell.kernel is not None and native.usable(build):
        paths.append("compiled")
    if cell.fused is not None:
        paths.append("fused")
    return [*paths, "loop"]


def choose(cell: Cell, requested: str, device: torch.device, build: bool = True, dtype: torch.dtype = torch.float32) -> Choice:
    """The path for `cell` on `device` (parameters in `dtype`): the one asked for where it can
    run, else the fastest that can (and why). `graph` asks for the fused step as a CUDA graph:
    here, fused."""
    paths = available(cell, device, build, dtype)
    if requested == "auto":
        return Choice(paths[0], "" if paths[0] == "compiled" else failed_here(cell, device, dtype))
    wanted = "fused" if requested == "graph" else requested
    if wanted in paths:
        return Choice(wanted)
    return Choice(paths[0], f"{requested} cannot run the {cell.title} on {device.type}: {why_not(cell, wanted, device, dtype)}")


def settle(choice: Choice, cell: Cell, device: torch.device) -> Choice:
    """A choice made without building the compiled recurrence, once it is built: the same, or,
    where the build failed, the fastest path left and why."""
    if choice.path != "compiled" or native.usable():
        return choice
    return Choice(available(cell, device)[0], f"the compiled recurrence cannot run: {native.unavailable()}")


def failed_here(cell: Cell, device: torch.device, dtype: torch.dtype) -> str:
    """Why `auto` runs another path where it would run the compiled one: this process tried to
    load or build it and could not (the first model to try says so through `settle`; any model
    made after it, here)."""
    if device.type == "cpu" and dtype == torch.float32 and cell.kernel is not None and native.failed():
        return f"the compiled recurrence cannot run: {native.unavailable()}"
    return ""


def why_not(cell: Cell, path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    if path == "compiled":
        if device.type != "cpu":
            return "the compiled recurrence is for a CPU"
        if dtype != torch.float32:
            return f"the compiled recurrence runs fp32 parameters, not {dtype}"
        if cell.kernel is None:
            return f"the {cell.title} ({cell.form}) has no compiled kernel"
        return native.status()
    return f"the {cell.title} has no {path} path"


def describe(choice: Choice) -> str:
    """'compiled (C++)', 'fused (Python)', 'loop (the equations)': for the start event and bench."""
    return {"compiled": "compiled (C++)", "fused": "fused (Python)", "loop": "loop (the equations)", "graph": "graph (CUDA)"}[choice.path]


def run_layer(choice: Choice, layer: ScratchLayer, X: torch.Tensor, state: State, W_h: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One layer over the sequence by the chosen path: every step's H (steps, batch, hiddens) and
    the final state, each (batch, hiddens). The one place the path is dispatched."""
    if choice.path == "loop":
        return cast(tuple[torch.Tensor, State], layer(X, state, W_h))
    dtype = compute_dtype(layer.W_x)
    cell = layer.cell
    if choice.path == "fused":
        assert cell.fused is not None  # `choose` takes fused only for a cell that has it
        return cell.fused(layer, X, state, dtype, W_h)
    return compiled_layer(layer, X, state, dtype, W_h)


# ---- shared by the fast paths ------------------------------------------------------------------


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of the matrix products: autocast's (bf16) where it is on, else the weights'."""
    device_type = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, without the microseconds a no-op `.to` still costs."""
    return x if x.dtype == dtype else x.to(dtype)


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


def weight_gradients(X: torch.Tensor, H_prev: torch.Tensor, dA_x: torch.Tensor, dA_h: torch.Tensor, num_inputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dW_x and dW_h summed over every step and batch row, in the packed layout, each one
    product over every step's columns side by side: dA_x and dA_h (blocks·hiddens, steps, batch)
    in the products' dtype, so BLAS sees one long inner dimension. For ids, X_t is one-hot, so
    dW_x is no product: each step's column of dA_x adds into its character's row (compiled on
    a CPU: `sum_by_id`). Under bf16 both accumulate in fp32 and round once."""
    rows, steps, batch = dA_x.shape
    Hp = H_prev.permute(1, 0, 2).reshape(-1, steps * batch)  # (hiddens, steps·batch), a copy
    dW_h = times_T(Hp, dA_h.view(rows, steps * batch))  # (hiddens, blocks·hiddens)
    if not X.is_floating_point():
        ids = X.reshape(-1)
        if dA_x.device.type == "cpu" and dA_x.dtype in (torch.float32, torch.bfloat16) and (library := native.loaded()) is not None:
            return library.sum_by_id(dA_x.view(rows, steps * batch), ids.long().contiguous(), num_inputs), dW_h  # (inputs, blocks·hiddens)
        wide = torch.promote_types(dA_x.dtype, torch.float32)  # bf16 adds up in fp32, float64 stays
        sums = torch.zeros(rows, num_inputs, dtype=wide, device=dA_x.device)
        return sums.index_add_(1, ids, dA_x.view(rows, steps * batch).to(wide)).T.contiguous(), dW_h  # (inputs, blocks·hiddens)
    Xf = X.permute(2, 0, 1).reshape(num_inputs, steps * batch).to(dA_x.dtype)  # (inputs, steps·batch)
    return times_T(Xf, dA_x.view(rows, steps * batch)), dW_h


# ---- the compiled path ---------------------------------------------------------------------------


def compiled_layer(layer: ScratchLayer, X: torch.Tensor, state: State, dtype: torch.dtype, W_h: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One layer by the cell's compiled kernel. The kernel carries H (in `dtype`, the products'
    operand) and one fp32 state S: the cell's second state (the LSTM's C), or H itself."""
    cell = layer.cell
    weights = layer.stacked(dtype, ids=not X.is_floating_point(), W_h=W_h)
    S_0 = state[-1]
    outputs, S_T = cast(
        tuple[torch.Tensor, torch.Tensor], CompiledSequence.apply(cell, X, weights, layer.W_x, W_h, layer.b, getattr(layer, "b_hh", None), state[0], S_0)
    )
    if len(cell.state) == 1:
        return outputs, (S_T,)
    return outputs, (outputs[-1], S_T)


def ops(cell: Cell, what: str) -> Any:
    """The compiled operation `what` (forward, backward, step, greedy, sample) of `cell`'s kernel."""
    return getattr(_library(), f"{what}_{cell.name}")


def packed(W: torch.Tensor) -> torch.Tensor:
    """W (K, N), float or bf16, as the compiled step reads it: in panels of columns, each
    contiguous (`pack` in csrc/recurrence.cpp, which says why and in what order)."""
    return cast(torch.Tensor, _library().pack(W.contiguous()))


def times(A: torch.Tensor, W: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = A W by the compiled step's product: A (batch, K) float, W as `packed` made it, out
    (batch, N) in W's dtype; each row's bits the same whatever the batch around it."""
    _library().times(A.float().contiguous(), W, out)
    return out


def _library() -> Any:
    library = native.recurrence()
    if library is None:
        raise ShapeError(f"the compiled recurrence is not available: {native.status()}")
    return library


class CompiledSequence(torch.autograd.Function):
    """One layer over a whole sequence by a cell's compiled kernel, with its hand-written
    backward through time.

    Inputs: the cell, X (steps, batch) ids or (steps, batch, inputs) floats, the layer's
    `Stacked` weights, the packed parameters W_x, W_h, b and b_hh (or None) that autograd routes
    the gradients to, then H_0 and S_0 (batch, hiddens) — the same tensor for a cell whose state
    is H alone. Outputs: H_1 … H_T (steps, batch, hiddens) in the compute dtype and S_T in fp32.
    """

    @staticmethod
    def forward(
        ctx: Any, cell: Cell, X: torch.Tensor, weights: Stacked, W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor, b_hh: torch.Tensor | None,
        H_0: torch.Tensor, S_0: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        ctx.set_materialize_grads(False)  # an unused S_T needs no zero gradient
        threads = torch.get_num_threads()
        S_0f = S_0.float()
        if weights.table is not None:
            saved, Hs, Ss = ops(cell, "forward")(weights.table, X.long().contiguous(), None, None, None, weights.W_hT, weights.b_h, H_0, S_0f, threads)
        else:
            assert weights.W_xT is not None  # Stacked holds W_xT for dense input
            XT = X.transpose(1, 2).to(weights.W_xT.dtype).contiguous()  # (steps, inputs, batch): free for a fast layer's output
            saved, Hs, Ss = ops(cell, "forward")(None, None, XT, weights.W_xT, weights.b, weights.W_hT, weights.b_h, H_0, S_0f, threads)
        # Saved through autograd, so an in-place change of the outputs (views of Hs) before
        # backward is an error rather than a silently wrong gradient.
        ctx.save_for_backward(X, W_x, W_h, saved, Hs, Ss)
        ctx.cell, ctx.has_b_hh = cell, b_hh is not None
        ctx.dtypes = (X.dtype, H_0.dtype, S_0.dtype)
        ctx.one_state = H_0 is S_0
        return Hs[1:].transpose(1, 2), Ss[-1].T  # (steps, batch, hiddens), (batch, hiddens)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dHs: torch.Tensor | None, dS_T: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        X, W_x, W_h, saved, Hs, Ss = ctx.saved_tensors
        cell: Cell = ctx.cell
        steps, hiddens, batch = Hs.shape[0] - 1, Hs.shape[1], Hs.shape[2]
        dtype = Hs.dtype  # the products'
        W_h_ = as_dtype(W_h, dtype).contiguous()  # (hiddens, blocks·hiddens)
        dHsT = Ss.new_zeros((steps, hiddens, batch)) if dHs is None else dHs.transpose(1, 2).float().contiguous()
        dS = None if dS_T is None else dS_T.float().contiguous()
        dA_x, dA_x_c, dA_h, dA_h_c, carry = ops(cell, "backward")(dHsT, dS, saved, Ss, W_h_, torch.get_num_threads())
        X_dtype, H_dtype, S_dtype = ctx.dtypes
        needs = ctx.needs_input_grad  # cell, X, weights, W_x, W_h, b, b_hh, H_0, S_0
        dX = None
        if needs[1]:
            dX = times_T(dA_x_c.view(-1, steps * batch).T, as_dtype(W_x, dtype)).view(steps, batch, -1).to(X_dtype)  # (steps, batch, inputs)
        dH_0 = (W_h_ @ dA_h_c[:, 0]).T.float() if needs[7] or needs[8] else None  # (batch, hiddens): through step 1's product
        if ctx.one_state:  # H_0 is S_0: its two uses' gradients add up
            dH = None if dH_0 is None else (dH_0 + carry.T).to(H_dtype)
            dH_0_grad, dS_0_grad = dH, None
        else:
            dH_0_grad = None if dH_0 is None else dH_0.to(H_dtype)
            dS_0_grad = carry.T.to(S_dtype) if needs[8] else None
        dW_x = dW_h = db = db_hh = None
        if any(needs[3:7]):
            dW_x, dW_h = weight_gradients(X, Hs[:-1], dA_x_c, dA_h_c, W_x.shape[0])
            dW_x, dW_h = dW_x.to(W_x.dtype), dW_h.to(W_h.dtype)
            db = dA_x.sum(dim=(1, 2))
            if ctx.has_b_hh:
                db_hh = dA_h[cell.block(cell.blocks[-1], hiddens)].sum(dim=(1, 2))
        return None, dX, None, dW_x, dW_h, db, db_hh, dH_0_grad, dS_0_grad
