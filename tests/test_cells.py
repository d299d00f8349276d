"""Every cell's two cores compute the same function, by every path.

With weights converted between them, a cell's scratch core — the readable loop, the LSTM's fused
path, the compiled kernel — and torch's module (nn.LSTM, nn.GRU, nn.RNN) give the same outputs,
final state and gradients of every parameter, input and initial state: to 1e-10 in float64 (the
loop and the fused path) and 1e-5 in float32 (4e-5 for a cell with no gate, the plain RNN; relative to the size of the values compared, so
large gradients are not held to a tighter bound than their float precision allows). In training
with DropConnect and dropout between layers (per element or locked) too: the same seed draws the
same masks in both. The GRU's d2l form equals the book's own code.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from lstmlm import cells, native
from lstmlm.cells.base import Cell, State, project
from lstmlm.cells.cores import ScratchCore, TorchCore, drop, dropconnect_mask
from lstmlm.errors import ShapeError
from lstmlm.model import CharLM, scratch_to_torch, torch_to_scratch

from support.references import assert_close

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
UNGATED_FP32 = 4e-5  # a cell with no gate (the plain RNN) amplifies fp32's rounding from step to step (float64: 1e-10 still)


def tol(cell: Cell, dtype: torch.dtype) -> float:
    ungated = not any(g.saturates for g in cell.gates)
    return UNGATED_FP32 if ungated and dtype == torch.float32 else TOL[dtype]


CELLS = [cells.get(name) for name in cells.NAMES]


def compiled_here() -> bool:
    return native.recurrence() is not None


def paths(cell: Cell, dtype: torch.dtype = torch.float32) -> list[str]:
    """The scratch core's paths for `cell` that can run `dtype` here: the compiled one runs fp32 only."""
    found = ["loop"] + (["fused"] if cell.fused is not None else [])
    if cell.kernel is not None and dtype == torch.float32 and compiled_here():
        found.append("compiled")
    return found


def cases(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> list[Any]:
    """(cell, path, dtype) for every cell, every path it has here, every dtype the path runs."""
    return [
        pytest.param(cell, path, dtype, id=f"{cell.name}-{path}-{'fp32' if dtype == torch.float32 else 'fp64'}")
        for cell in CELLS
        for dtype in dtypes
        for path in paths(cell, dtype)
    ]


# ---- helpers -------------------------------------------------------------------------------


def core_dict(state_dict: dict[str, torch.Tensor], convert: Any, cell: Cell) -> dict[str, torch.Tensor]:
    """A core's state dict through model.py's conversion (which works on `core.`-prefixed CharLM keys)."""
    converted = convert({f"core.{k}": v for k, v in state_dict.items()}, cell)
    return {k.removeprefix("core."): v for k, v in converted.items()}


def make_cores(
    cell: Cell, num_inputs: int, num_hiddens: int, num_layers: int, dtype: torch.dtype, path: str, seed: int = 0, **regularization: Any
) -> tuple[ScratchCore, TorchCore]:
    """The scratch core on `path` and torch's module with the same random weights (and the same
    `dropout`, `locked`, `weight_drop`, when given). The weights start as torch's with both of
    its biases random, so the conversion's handling of bias_ih and bias_hh is exercised too. Their
    scale, 1.5/√hiddens, keeps every unit lively but few saturated, where a plain RNN's recurrence
    would amplify fp32's rounding step after step."""
    torch.manual_seed(seed)
    torch_core = TorchCore(cell, num_inputs, num_hiddens, num_layers, **regularization).to(dtype)
    with torch.no_grad():
        for p in torch_core.parameters():
            p.normal_(0.0, 1.5 / num_hiddens**0.5)
    scratch = ScratchCore(cell, num_inputs, num_hiddens, num_layers, path=path, **regularization).to(dtype)
    assert scratch.path == path
    scratch.load_state_dict(core_dict(torch_core.state_dict(), torch_to_scratch, cell))
    return scratch, torch_core


def make_inputs(
    cell: Cell, steps: int, batch: int, num_inputs: int, num_hiddens: int, num_layers: int, dtype: torch.dtype, kind: str, initial: str
) -> tuple[torch.Tensor, State | None]:
    """Ids (steps, batch) or dense (steps, batch, inputs) inputs, and a zero (None) or random state."""
    X = torch.randint(0, num_inputs, (steps, batch)) if kind == "ids" else torch.randn(steps, batch, num_inputs, dtype=dtype, requires_grad=True)
    if initial == "zero":
        return X, None
    return X, tuple(torch.randn(num_layers, batch, num_hiddens, dtype=dtype, requires_grad=True) for _ in cell.state)


def run(core: torch.nn.Module, X: torch.Tensor, state: State | None, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs, the final state, and the gradients of a loss that uses all of them with respect
    to the dense input and the initial state (where they require grad)."""
    outputs, final = core(X, state)
    loss = (outputs * weights).sum() + sum((S * S * (k + 1)).sum() for k, S in enumerate(final))  # every output and state reach the loss
    leaves = [t for t in (X, *(state or ())) if t.requires_grad]
    core.zero_grad(set_to_none=True)
    grads = torch.autograd.grad(loss, leaves, retain_graph=True) if leaves else ()
    loss.backward()
    return (outputs.detach(), *(S.detach() for S in final), *grads)


def assert_same_gradients(cell: Cell, scratch: ScratchCore, torch_core: TorchCore, tol: float, what: str) -> None:
    """torch's parameter gradients against the scratch core's, mapped through the conversion: the
    gradient of each bias torch sums is the gradient of the sum, b; a bias inside the recurrence
    (the GRU's b_hh) has its own."""
    grads = {name: p.grad for name, p in scratch.named_parameters()}
    for k in range(scratch.num_layers):
        packed = {name: grads[f"layers.{k}.{name}"] for name in cell.packed_names()}
        mapped = cell.to_torch(packed)
        bias_hh = packed["b"].clone()
        if cell.recurrent_bias:
            bias_hh[cell.block(cell.blocks[-1], scratch.num_hiddens)] = packed["b_hh"]
        mapped["bias_hh"] = bias_hh
        for name, expected in mapped.items():
            assert_close(getattr(torch_core.module, f"{name}_l{k}").grad, expected, tol, f"{what} d{name}_l{k}")


# ---- forward and backward equivalence -------------------------------------------------------

# (steps, batch, inputs, hiddens, layers). "11x13": the kernels' elementwise loops are vectorized,
# and 11 × 13 (the forward's loop over units × batch) and 11 (the backward's over the batch) are
# whole vectors and a remainder on every vector width, where the other shapes fill vectors exactly
# or never fill one.
SHAPES = [(1, 1, 3, 4, 1), (7, 5, 10, 8, 1), (6, 3, 10, 8, 3), (12, 4, 28, 40, 2), (5, 11, 6, 13, 1)]
SHAPE_IDS = ["1x1", "7x5", "3-layers", "2-layers-vocab28", "11x13"]


@pytest.mark.parametrize(("cell", "path", "dtype"), cases())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["ids", "dense"])
@pytest.mark.parametrize("initial", ["zero", "random"])
def test_the_scratch_core_is_torchs_module(cell: Cell, path: str, dtype: torch.dtype, shape: tuple[int, ...], kind: str, initial: str) -> None:
    steps, batch, num_inputs, num_hiddens, num_layers = shape
    scratch, torch_core = make_cores(cell, num_inputs, num_hiddens, num_layers, dtype, path)
    X, state = make_inputs(cell, steps, batch, num_inputs, num_hiddens, num_layers, dtype, kind, initial)
    weights = torch.randn(steps, batch, num_hiddens, dtype=dtype)
    expected = run(torch_core, X, state, weights)
    actual = run(scratch, X, state, weights)
    names = ["outputs", *cell.state, *(["dX"] if kind == "dense" else []), *(f"d{n}_0" for n in cell.state if state)]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, tol(cell, dtype), f"{cell.name} {path} {name}")
    assert_same_gradients(cell, scratch, torch_core, tol(cell, dtype), f"{cell.name} {path}")


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_the_compiled_kernel_cut_by_units_across_threads_is_one_thread(cell: Cell, kind: str) -> None:
    """The compiled recurrence cuts every step by hidden units (a part a thread, meeting once a
    step): three parts give one part's outputs, state and every gradient."""
    if "compiled" not in paths(cell):
        pytest.skip(f"the {cell.title} has no compiled kernel here: {native.status()}")
    scratch, _ = make_cores(cell, 12, 96, 2, torch.float32, "compiled")
    X, state = make_inputs(cell, 9, 8, 12, 96, 2, torch.float32, kind, "random")
    weights = torch.randn(9, 8, 96)
    threads = torch.get_num_threads()
    results = {}
    try:
        for parts in (1, 3):  # 96 units: three parts of 32
            torch.set_num_threads(parts)
            results[parts] = [*run(scratch, X, state, weights), *(p.grad.clone() for p in scratch.parameters())]
    finally:
        torch.set_num_threads(threads)
    for k, (a, e) in enumerate(zip(results[3], results[1], strict=True)):
        assert_close(a, e, 1e-5, f"tensor {k}")


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_the_compiled_kernel_with_long_products_cut_in_chunks_is_torchs_module(cell: Cell) -> None:
    """A product whose B would not fit a core's cache is summed over chunks of its inner
    dimension (recurrence.cpp's k_chunk: 128 KiB of B, 109 rows at batch 300): at 120 units
    every cell's backward product (blocks·120 rows of B) is cut, and the RNN's forward one too."""
    if "compiled" not in paths(cell):
        pytest.skip(f"the {cell.title} has no compiled kernel here: {native.status()}")
    scratch, torch_core = make_cores(cell, 10, 120, 1, torch.float32, "compiled")
    X, state = make_inputs(cell, 3, 300, 10, 120, 1, torch.float32, "dense", "random")
    weights = torch.randn(3, 300, 120)
    for k, (a, e) in enumerate(zip(run(scratch, X, state, weights), run(torch_core, X, state, weights), strict=True)):
        assert_close(a, e, tol(cell, torch.float32), f"{cell.name} tensor {k}")
    assert_same_gradients(cell, scratch, torch_core, tol(cell, torch.float32), cell.name)


@pytest.mark.parametrize(("cell", "path", "dtype"), list(cases((torch.float64,))))
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_gradcheck(cell: Cell, path: str, dtype: torch.dtype, kind: str) -> None:
    """Analytic gradients of every parameter, the input and the initial state equal finite differences."""
    torch.manual_seed(0)
    steps, batch, num_inputs, num_hiddens, num_layers = 4, 3, 3, 3, 2
    core = ScratchCore(cell, num_inputs, num_hiddens, num_layers, path=path).double()
    params = {name: (torch.randn_like(p) * 0.5).requires_grad_() for name, p in core.named_parameters()}
    names = list(params)
    X, state = make_inputs(cell, steps, batch, num_inputs, num_hiddens, num_layers, torch.float64, kind, "random")
    assert state is not None

    def f(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[0] if kind == "dense" else X
        rest = tensors[1:] if kind == "dense" else tensors
        initial, weights = rest[: len(cell.state)], rest[len(cell.state) :]
        outputs, final = functional_call(core, dict(zip(names, weights)), (inputs, tuple(initial)))
        return outputs, *final

    tensors = ((X,) if kind == "dense" else ()) + (*state, *params.values())
    assert gradcheck(f, tensors, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(("cell", "path", "dtype"), cases((torch.float64,)) + cases((torch.float32,)))
def test_two_chunks_equal_one_run(cell: Cell, path: str, dtype: torch.dtype) -> None:
    """The final state of the first chunk, fed to the second, continues the sequence exactly."""
    scratch, torch_core = make_cores(cell, 10, 8, 2, dtype, path)
    X = torch.randint(0, 10, (9, 3))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for core in (scratch, torch_core):
        whole, final = core(X)
        first, state = core(X[:4])
        second, final2 = core(X[4:], state)
        assert_close(torch.cat([first, second]), whole, tol, "outputs")
        for name, a, e in zip(cell.state, final2, final, strict=True):
            assert_close(a, e, tol, name)


@pytest.mark.parametrize(("cell", "path", "dtype"), cases((torch.float64,)))
def test_ids_equal_one_hot_vectors(cell: Cell, path: str, dtype: torch.dtype) -> None:
    scratch, torch_core = make_cores(cell, 10, 8, 2, dtype, path)
    X = torch.randint(0, 10, (6, 4))
    for core in (scratch, torch_core):
        by_id, final = core(X)
        by_vector, final2 = core(F.one_hot(X, 10).double())
        assert_close(by_id, by_vector, 1e-12, "outputs")
        for a, e in zip(final, final2, strict=True):
            assert_close(a, e, 1e-12, "state")


def test_row_selection_equals_one_hot_matmul() -> None:
    """X_t W_x for one-hot X_t is the row of W_x at the id: exactly the seed's one-hot product."""
    torch.manual_seed(0)
    W_x = torch.randn(28, 16)
    X = torch.randint(0, 28, (5, 7))  # (batch, steps), the seed's layout
    literal = F.one_hot(X.T, 28).float() @ W_x  # the seed: one-hot (steps, batch, vocab) times W
    assert torch.equal(project(X.T, W_x), literal)


# ---- conversion ------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_conversions_round_trip_exactly(cell: Cell) -> None:
    """scratch → torch → scratch gives the very tensors back; torch → scratch → torch gives a
    module of the same function (the biases torch keeps two of come back summed into bias_ih)."""
    scratch, torch_core = make_cores(cell, 10, 8, 3, torch.float32, "loop")
    with torch.no_grad():
        for p in scratch.parameters():
            p.normal_()
    state = scratch.state_dict()
    back = core_dict(core_dict(state, scratch_to_torch, cell), torch_to_scratch, cell)
    assert back.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(back[name], value), name
    again = TorchCore(cell, 10, 8, 3)
    again.load_state_dict(core_dict(core_dict(torch_core.state_dict(), torch_to_scratch, cell), scratch_to_torch, cell))
    X = torch.randint(0, 10, (5, 2))
    with torch.no_grad():
        assert_close(again(X)[0], torch_core(X)[0], 1e-6, "the same function")


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_the_article_names_are_views_of_the_packed_parameters(cell: Cell) -> None:
    scratch = ScratchCore(cell, 5, 4, 1, path="loop")
    layer = scratch.scratch_layers()[0]
    names = cell.parameter_names()
    assert len(names) == 3 * cell.width + (1 if cell.recurrent_bias else 0)
    for g in cell.blocks:
        view = getattr(layer, f"W_h{g}")
        assert view.shape == (4, 4) and view.data_ptr() == layer.W_h[:, cell.block(g, 4)].data_ptr()
    repacked = cell.pack(layer.views())
    for name in cell.packed_names():
        assert torch.equal(repacked[name], getattr(layer, name)), name


# ---- refusing bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
@pytest.mark.parametrize("core_name", ["scratch", "torch"])
def test_bad_input_is_refused(cell: Cell, core_name: str) -> None:
    scratch, torch_core = make_cores(cell, 10, 8, 2, torch.float32, "loop")
    core = scratch if core_name == "scratch" else torch_core
    good = tuple(torch.zeros(2, 2, 8) for _ in cell.state)
    bad_batch = (torch.zeros(2, 3, 8), *good[1:])
    cases_ = [
        (torch.zeros(4, 2, dtype=torch.long), bad_batch, "state H must be (2, 2, 8) (layers, batch, hiddens), got (2, 3, 8)"),
        (torch.zeros(4, 2, dtype=torch.long), (torch.zeros(2, 2, 8, dtype=torch.long), *good[1:]), "state H must be floating point, got torch.int64"),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(2, 2, 8), f"the {cell.title}'s state must be a tuple ({', '.join(cell.state)})"),
        (torch.zeros(4, 2, dtype=torch.long), (*good, torch.zeros(2, 2, 8)), f"the {cell.title}'s state must be a tuple ({', '.join(cell.state)})"),
        (torch.zeros(4, 2, 9), None, "dense input must be (steps, batch, 10), got (4, 2, 9)"),
        (torch.zeros(4, 2, 1, dtype=torch.long), None, "id input must be (steps, batch), got (4, 2, 1)"),
        (torch.full((4, 2), 10), None, "ids must lie in [0, 10), got [10, 10]"),
        (torch.zeros(4, 2, dtype=torch.bool), None, "input must be int64 or int32 ids or floating point, got torch.bool"),
    ]
    for X, state, message in cases_:
        with pytest.raises(ShapeError, match=f"^{re.escape(message)}$"):
            core(X, state)


def test_moving_the_parameters_chooses_the_path_again() -> None:
    """The compiled kernels run fp32 on a CPU: a core moved to float64 (or to a GPU) takes the
    fastest path that runs there, and says why not the one asked for."""
    if not compiled_here():
        pytest.skip(native.status())
    for name in cells.NAMES:
        cell = cells.get(name)
        assert ScratchCore(cell, 10, 8, 1).path == "compiled"  # auto, on a CPU
        moved = ScratchCore(cell, 10, 8, 1, path="compiled").double()
        assert moved.path == ("fused" if cell.fused is not None else "loop")
        assert moved.choice.why.endswith("runs fp32 parameters, not torch.float64")
        assert moved.float().path == "compiled" and not moved.choice.why


# ---- the fast paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c) if p != "loop"], ids=lambda x: getattr(x, "name", x))
def test_a_fast_path_is_one_autograd_node_per_layer(cell: Cell, path: str) -> None:
    """The hand-written backward replaces the per-step graph: autograd records one node a layer."""
    scratch, _ = make_cores(cell, 10, 8, 2, torch.float32, path)
    outputs, _ = scratch(torch.randint(0, 10, (6, 3)))
    node = {"fused": "FusedLSTMBackward", "compiled": "CompiledSequenceBackward"}[path]
    assert type(outputs.grad_fn).__name__ == node
    below = [f for f, _ in outputs.grad_fn.next_functions if f is not None]
    assert any(type(f).__name__ == node for f in below) or any(type(g).__name__ == node for f in below for g, _ in f.next_functions if g is not None)


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c) if p != "loop"], ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("steps", [1, 5], ids=["one-step", "sequence"])
def test_a_fast_path_without_autograd_is_the_loop(cell: Cell, path: str, steps: int) -> None:
    """Generation and evaluation run without autograd (one step at a time, or a whole sequence):
    the same function still, state carried."""
    scratch, _ = make_cores(cell, 10, 8, 2, torch.float32, path)
    loop, _ = make_cores(cell, 10, 8, 2, torch.float32, "loop")
    X, state = make_inputs(cell, steps, 3, 10, 8, 2, torch.float32, "ids", "random")
    with torch.no_grad():
        expected, final = loop(X, state)
        actual, final2 = scratch(X, state)
    assert_close(actual, expected, 1e-6, "outputs")
    for a, e in zip(final2, final, strict=True):
        assert_close(a, e, 1e-6, "state")


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c) if p != "loop"], ids=lambda x: getattr(x, "name", x))
def test_stacked_weights_follow_parameter_updates_without_autograd(cell: Cell, path: str) -> None:
    """Generation runs without autograd and caches the stacked weights: an optimizer step or a
    load_state_dict between two calls must still be seen."""
    scratch, _ = make_cores(cell, 10, 8, 2, torch.float32, path)
    loop, _ = make_cores(cell, 10, 8, 2, torch.float32, "loop")
    X = torch.randint(0, 10, (5, 2))
    with torch.no_grad():
        scratch(X)  # fills the cache
    scratch(X)[0].sum().backward()
    torch.optim.SGD(scratch.parameters(), lr=0.1).step()
    loop.load_state_dict(scratch.state_dict())
    with torch.no_grad():
        assert_close(scratch(X)[0], loop(X)[0], 1e-6, "after an optimizer step")
        scratch.load_state_dict({k: v * 0.5 for k, v in scratch.state_dict().items()})
        loop.load_state_dict(scratch.state_dict())
        assert_close(scratch(X)[0], loop(X)[0], 1e-6, "after load_state_dict")


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c) if p != "loop"], ids=lambda x: getattr(x, "name", x))
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_a_fast_path_under_bf16_autocast(cell: Cell, path: str, kind: str) -> None:
    """Under CPU bf16 autocast the products run in bf16 (the outputs come out bf16) while the
    state and every gradient stay fp32 and close to the fp32 run."""
    scratch, _ = make_cores(cell, 10, 16, 2, torch.float32, path)
    with torch.no_grad():  # gates of order one, as in training; bf16 keeps 8 bits of them
        for p in scratch.parameters():
            p.mul_(0.5)
    X, state = make_inputs(cell, 12, 4, 10, 16, 2, torch.float32, kind, "random")
    weights = torch.randn(12, 4, 16)
    expected = run(scratch, X, state, weights)
    expected_grads = [p.grad.clone() for p in scratch.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, final = scratch(X, state)
        actual = run(scratch, X, state, weights)
    assert outputs.dtype == torch.bfloat16
    assert all(S.dtype == torch.float32 for S in final)
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a.float(), e, 3e-2, f"bf16 tensor {k}")
    for (name, p), e in zip(scratch.named_parameters(), expected_grads):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, e, 3e-2, f"bf16 d{name}")


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c) if p != "loop"], ids=lambda x: getattr(x, "name", x))
def test_changing_outputs_in_place_is_refused(cell: Cell, path: str) -> None:
    """The backward reads the saved H_t, of which the outputs are views: autograd refuses an
    in-place change rather than let it corrupt the gradient."""
    scratch, _ = make_cores(cell, 10, 8, 1, torch.float32, path)
    outputs, _ = scratch(torch.randint(0, 10, (4, 2)))
    with pytest.raises(RuntimeError, match="modified inplace"):
        outputs.mul_(2)


@pytest.mark.parametrize(("cell", "path"), [(c, p) for c in CELLS for p in paths(c)], ids=lambda x: getattr(x, "name", x))
def test_every_path_is_torchs_module_at_the_d2l_size(cell: Cell, path: str) -> None:
    """35 steps, batch 32, 28 ids, 256 hiddens, torch's own initialisation: the sizes where the
    fast paths' buffers and their one product for all weight gradients matter most."""
    torch.manual_seed(0)
    torch_core = TorchCore(cell, 28, 256, 1)
    scratch = ScratchCore(cell, 28, 256, 1, path=path)
    scratch.load_state_dict(core_dict(torch_core.state_dict(), torch_to_scratch, cell))
    X = torch.randint(0, 28, (35, 32))
    state = tuple(torch.randn(1, 32, 256) * 0.5 for _ in cell.state)
    weights = torch.randn(35, 32, 256)
    for k, (a, e) in enumerate(zip(run(scratch, X, state, weights), run(torch_core, X, state, weights), strict=True)):
        assert_close(a, e, 1e-5, f"tensor {k}")
    assert_same_gradients(cell, scratch, torch_core, 1e-5, path)


# ---- regularization: DropConnect on W_h, dropout between layers --------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_dropconnect_mask_is_bernoulli_scaled_to_keep_the_expectation(cell: Cell) -> None:
    """Each entry 0 or 1/(1 - p), dropped with probability p: E[W_h ⊙ M] = W_h."""
    torch.manual_seed(0)
    M = dropconnect_mask(cell, 64, 0.3, torch.empty(0))
    assert M.shape == (64, cell.width * 64)
    assert M.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert (M == 0).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert M.mean().item() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(("cell", "path", "dtype"), cases((torch.float64,)) + [c for c in cases((torch.float32,)) if "compiled" in c.id])
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_dropconnect_runs_each_batch_on_W_h_times_one_new_mask(cell: Cell, path: str, dtype: torch.dtype, kind: str) -> None:
    """A batch with DropConnect is the same core without it on W_h ⊙ M — one mask for every
    step (and row) of the batch, drawn from torch's generator, a new one the next batch — and
    W_x, b as they are; the gradient reaches W_h through the mask (dL/dW_h = dL/dW̃_h ⊙ M)."""
    core, _ = make_cores(cell, 10, 8, 2, dtype, path, weight_drop=0.4)
    X, state = make_inputs(cell, 6, 3, 10, 8, 2, dtype, kind, "random")
    weights = torch.randn(6, 3, 8, dtype=dtype)
    torch.manual_seed(3)
    batches = [run(core, X, state, weights) + tuple(p.grad for p in core.parameters()) for _ in range(2)]
    torch.manual_seed(3)
    masks = [[dropconnect_mask(cell, 8, 0.4, weights) for _ in range(2)] for _ in range(2)]  # a batch's masks: one a layer
    plain = ScratchCore(cell, 10, 8, 2, path="loop").to(dtype)

    def mask_of(name: str, batch_masks: list[torch.Tensor]) -> torch.Tensor | float:
        return batch_masks[int(name.split(".")[1])] if name.endswith("W_h") else 1.0

    for batch, batch_masks in zip(batches, masks):
        plain.load_state_dict({name: v * mask_of(name, batch_masks) for name, v in core.state_dict().items()})
        expected = run(plain, X, state, weights)
        outputs, grads = batch[: len(expected)], batch[len(expected) :]
        for a, e in zip(outputs, expected, strict=True):
            assert_close(a, e, tol(cell, dtype))
        for (name, p), g in zip(plain.named_parameters(), grads):
            assert_close(g, p.grad * mask_of(name, batch_masks), tol(cell, dtype), f"d{name}")
    assert not torch.equal(batches[0][0], batches[1][0])  # a new mask, new outputs


REGULARIZED = [
    pytest.param({"weight_drop": 0.3}, id="weight-drop"),
    pytest.param({"dropout": 0.4}, id="dropout-between-layers"),
    pytest.param({"dropout": 0.4, "locked": True}, id="locked-between-layers"),
    pytest.param({"dropout": 0.4, "locked": True, "weight_drop": 0.3}, id="weight-drop-and-locked"),
]


@pytest.mark.parametrize(("cell", "path", "dtype"), cases())
@pytest.mark.parametrize("regularization", REGULARIZED)
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_the_cores_agree_in_training_with_regularization(cell: Cell, path: str, dtype: torch.dtype, regularization: dict[str, Any], kind: str) -> None:
    """Same seed, same masks: DropConnect drawn in the scratch layout (Mᵀ for torch's W_hᵀ),
    dropout between layers per element or locked; outputs, state and every gradient agree."""
    scratch, torch_core = make_cores(cell, 10, 8, 3, dtype, path, **regularization)
    X, state = make_inputs(cell, 7, 4, 10, 8, 3, dtype, kind, "random")
    weights = torch.randn(7, 4, 8, dtype=dtype)
    torch.manual_seed(11)
    expected = run(torch_core, X, state, weights)
    torch.manual_seed(11)
    actual = run(scratch, X, state, weights)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, tol(cell, dtype), f"{path} output {i}")
    assert_same_gradients(cell, scratch, torch_core, tol(cell, dtype), path)
    torch.manual_seed(12)
    assert not torch.equal(run(scratch, X, state, weights)[0], expected[0])  # the masks do act


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_dropconnect_is_off_in_evaluation(cell: Cell) -> None:
    """model.eval(): the core without DropConnect, deterministic, and no number drawn."""
    for path in paths(cell):
        core, torch_core = make_cores(cell, 10, 8, 2, torch.float32, path, weight_drop=0.5)
        plain, _ = make_cores(cell, 10, 8, 2, torch.float32, path)
        for c in (core, torch_core):
            c.eval()
            X = torch.randint(0, 10, (5, 3))
            rng = torch.get_rng_state()
            with torch.no_grad():
                first, second = c(X)[0], c(X)[0]
                assert torch.equal(torch.get_rng_state(), rng)
                assert torch.equal(first, second)
                assert not torch.equal(first, c.train()(X)[0])
        with torch.no_grad():
            assert torch.equal(core.eval()(X)[0], plain.eval()(X)[0])


def test_locked_dropout_keeps_one_mask_per_sequence_over_time() -> None:
    """Locked: every step of a sequence shares the mask (1/(1 - p) or 0 per feature); per
    element: each step has its own."""
    torch.manual_seed(0)
    X = torch.ones(20, 4, 16)  # (steps, batch, features)
    locked = drop(X, 0.5, locked=True)
    assert torch.equal(locked, locked[:1].expand_as(locked))
    assert set(locked.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(locked[:, 0], locked[:, 1])  # one mask per sequence, not per batch
    plain = drop(X, 0.5, locked=False)
    assert not torch.equal(plain, plain[:1].expand_as(plain))
    assert drop(X, 0.0, locked=True) is X


@pytest.mark.parametrize("cell", CELLS, ids=cells.NAMES)
def test_stacked_weights_are_not_cached_for_a_masked_W_h(cell: Cell) -> None:
    """Without autograd, a masked W_h (new every batch, its storage reusable by the next) is
    stacked afresh: the cache serves the parameter's own weights only."""
    core = ScratchCore(cell, 10, 8, 1, path="loop")
    layer = core.scratch_layers()[0]
    first = cell.blocks[0]
    with torch.no_grad():
        own = layer.stacked(torch.float32, ids=True)
        assert layer.stacked(torch.float32, ids=True) is own  # cached
        for scale in (0.0, 2.0):
            masked = layer.stacked(torch.float32, ids=True, W_h=layer.W_h * scale)
            assert masked is not own
            assert_close(masked.W_hT[cell.block(first, 8)], (layer.W_h * scale).T[cell.block(first, 8)], 0.0, "W_hᵀ, the first block")
        assert layer.stacked(torch.float32, ids=True) is own


# ---- the paths, chosen once ----------------------------------------------------------------------


def test_a_path_asked_for_that_cannot_run_here_falls_back_and_says_why() -> None:
    gru_d2l = cells.get("gru", "d2l")
    core = ScratchCore(gru_d2l, 5, 4, 1, path="compiled")
    assert core.path == "loop"
    assert "has no compiled kernel" in core.choice.why
    assert ScratchCore(cells.get("gru"), 5, 4, 1, path="fused").choice.why.endswith("has no fused path")
    assert ScratchCore(cells.get("lstm"), 5, 4, 1, path="compiled", device="meta").path == "fused"


# ---- the GRU's two forms ---------------------------------------------------------------------


def book_gru(inputs: torch.Tensor, state: tuple[torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """d2l's GRU section, from scratch, as the book writes it (chapter 10.2)."""
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        Y = H @ W_hq + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def book_gru_params(vocab_size: int, num_hiddens: int) -> list[torch.Tensor]:
    """The book's get_params for the GRU: N(0, 0.01²) weights drawn z, r, then the candidate's."""

    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size=shape) * 0.01

    def three() -> tuple[torch.Tensor, ...]:
        return normal((vocab_size, num_hiddens)), normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens)

    return [*three(), *three(), *three(), normal((num_hiddens, vocab_size)), torch.zeros(vocab_size)]


def test_the_d2l_gru_is_the_books_code() -> None:
    """CharLM with the GRU's d2l form, seeded, draws the book's parameters and computes the book's
    function: the seed's one-hot input, the reset gate before the product."""
    vocab_size, hiddens = 28, 32
    torch.manual_seed(5)
    params = book_gru_params(vocab_size, hiddens)
    torch.manual_seed(5)
    model = CharLM(vocab_size, hiddens, cell=cells.get("gru", "d2l"), path="loop")
    layer = model.core.scratch_layers()[0]  # type: ignore[union-attr]
    named = dict(zip(["W_xz", "W_hz", "b_z", "W_xr", "W_hr", "b_r", "W_xh", "W_hh", "b_h"], params))
    for name, value in named.items():
        assert torch.equal(getattr(layer, name), value), name
    assert torch.equal(model.W_hq, params[9])
    X = torch.randint(0, vocab_size, (2, 9))  # (batch, steps)
    H_0 = torch.randn(2, hiddens) * 0.3
    expected, (H,) = book_gru(F.one_hot(X.T, vocab_size).float(), (H_0,), params)  # (steps·batch, vocab), the book's layout
    with torch.no_grad():
        logits, (H_T,) = model(X, (H_0[None],))
    assert_close(logits.transpose(0, 1).reshape(-1, vocab_size), expected, 1e-6, "the book's outputs")
    assert_close(H_T[0], H, 1e-6, "the book's H")


def test_the_two_gru_forms_differ_where_the_reset_gate_sits() -> None:
    """The same parameters (b_hh zero) give different functions: R ⊙ (H W_hh) against (R ⊙ H) W_hh."""
    torch.manual_seed(0)
    cudnn_form = ScratchCore(cells.get("gru"), 6, 5, 1, path="loop")
    d2l_form = ScratchCore(cells.get("gru", "d2l"), 6, 5, 1, path="loop")
    with torch.no_grad():
        for p in cudnn_form.parameters():
            p.normal_()
        cudnn_form.scratch_layers()[0].b_hh.zero_()
    d2l_form.load_state_dict({k: v for k, v in cudnn_form.state_dict().items() if not k.endswith("b_hh")})
    X = torch.randint(0, 6, (4, 3))
    with torch.no_grad():
        assert not torch.allclose(cudnn_form(X)[0], d2l_form(X)[0])
    with pytest.raises(ShapeError, match="has no torch module"):
        TorchCore(cells.get("gru", "d2l"), 6, 5, 1)


@pytest.mark.parametrize(("name", "form"), [("lstm", "cudnn"), ("gru", "cudnn"), ("gru", "d2l"), ("rnn", "cudnn")])
@pytest.mark.parametrize("core_name", ["scratch", "cudnn"])
def test_the_registry_counts_what_the_modules_hold(name: str, form: str, core_name: str) -> None:
    """`lstmlm runs` counts parameters from the registry's entries, without torch: they agree with
    the cell and with the modules it builds, layer by layer, for every form and core."""
    from lstmlm.config import ModelConfig
    from lstmlm.sizes import num_parameters

    cell = cells.get(name, form)
    entry = cells.REGISTRY[name]
    assert cell.width == entry.blocks and cell.recurrent_bias == (form in entry.recurrent_bias)
    if core_name == "cudnn" and not cell.torch_equivalent:
        pytest.skip("the d2l GRU has no torch module")
    cfg = ModelConfig(model=core_name, cell=name, gru_form=form, hidden=24, layers=2, embedding=7)
    model = CharLM.from_config(cfg, 13)
    assert num_parameters(cfg, 13) == sum(p.numel() for p in model.parameters())
