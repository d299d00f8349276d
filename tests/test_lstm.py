"""The two recurrent cores compute the same function.

With weights converted between them, the article's scratch LSTM (the per-gate reference loop
and the fused path) and torch's nn.LSTM give the same outputs, final state and gradients of
every parameter, input and initial state: to 1e-5 in float32 and 1e-10 in float64 (relative to
the size of the values compared, so large gradients are not held to a tighter bound than their
float precision allows). In training with DropConnect and dropout between layers (per element
or locked) too: the same seed draws the same masks in both.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from lstmlm.errors import ShapeError
from lstmlm.fused import split_batch
from lstmlm.lstm import CudnnLSTM, ScratchLSTM, State, drop, dropconnect_mask, project
from lstmlm.model import cudnn_to_scratch, scratch_to_cudnn

from conftest import assert_close

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# (steps, batch, inputs, hiddens, layers)
SHAPES = [(1, 1, 3, 4, 1), (7, 5, 10, 8, 1), (6, 3, 10, 8, 3), (12, 4, 28, 16, 2)]
SHAPE_IDS = ["1x1", "7x5", "3-layers", "2-layers-vocab28"]


# ---- helpers -------------------------------------------------------------------------------


def to_cudnn(core_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ScratchLSTM state dict → a CudnnLSTM one (model.py converts CharLM keys, `core.`-prefixed)."""
    converted = scratch_to_cudnn({f"core.{k}": v for k, v in core_state.items()})
    return {k.removeprefix("core."): v for k, v in converted.items()}


def to_scratch(core_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = cudnn_to_scratch({f"core.{k}": v for k, v in core_state.items()})
    return {k.removeprefix("core."): v for k, v in converted.items()}


def make_cores(
    num_inputs: int, num_hiddens: int, num_layers: int, dtype: torch.dtype, seed: int = 0, **regularization: Any
) -> tuple[ScratchLSTM, ScratchLSTM, CudnnLSTM]:
    """The reference loop, the fused path and nn.LSTM with the same random weights (and the
    same `dropout`, `locked`, `weight_drop`, when given).

    The weights start as nn.LSTM's with both of its biases random, so the conversion's summing
    of bias_ih and bias_hh is exercised too; their scale keeps the gates away from saturation.
    """
    torch.manual_seed(seed)
    cudnn = CudnnLSTM(num_inputs, num_hiddens, num_layers, **regularization).to(dtype)
    with torch.no_grad():
        for p in cudnn.parameters():
            p.normal_(0.0, 0.5)
    reference = ScratchLSTM(num_inputs, num_hiddens, num_layers, fused=False, **regularization).to(dtype)
    fused = ScratchLSTM(num_inputs, num_hiddens, num_layers, fused=True, **regularization).to(dtype)
    reference.load_state_dict(to_scratch(cudnn.state_dict()))
    fused.load_state_dict(to_scratch(cudnn.state_dict()))
    return reference, fused, cudnn


def make_inputs(
    steps: int, batch: int, num_inputs: int, num_hiddens: int, num_layers: int, dtype: torch.dtype, kind: str, initial: str
) -> tuple[torch.Tensor, State | None]:
    """Ids (steps, batch) or dense (steps, batch, inputs) inputs, and a zero (None) or random state."""
    if kind == "ids":
        X = torch.randint(0, num_inputs, (steps, batch))
    else:
        X = torch.randn(steps, batch, num_inputs, dtype=dtype, requires_grad=True)
    if initial == "zero":
        return X, None
    shape = (num_layers, batch, num_hiddens)
    H = torch.randn(shape, dtype=dtype, requires_grad=True)
    C = torch.randn(shape, dtype=dtype, requires_grad=True)
    return X, (H, C)


def run(core: torch.nn.Module, X: torch.Tensor, state: State | None, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs, final H and C, and the gradients of a loss that uses all three with respect to
    the dense input and the initial state (where they require grad)."""
    outputs, (H, C) = core(X, state)
    loss = (outputs * weights).sum() + (H * H).sum() + C.sum()  # every output and both states reach the loss
    leaves = [t for t in (X, *(state or ())) if t.requires_grad]
    core.zero_grad(set_to_none=True)
    grads = torch.autograd.grad(loss, leaves, retain_graph=True) if leaves else ()
    loss.backward()
    return (outputs.detach(), H.detach(), C.detach(), *grads)


def scratch_grads_as_cudnn(core: ScratchLSTM) -> dict[str, torch.Tensor]:
    """The scratch parameter gradients mapped through the same conversion as the weights."""
    return to_cudnn({name: p.grad for name, p in core.named_parameters()})


# ---- forward and backward equivalence -------------------------------------------------------


@pytest.fixture(params=[1, 3], ids=["whole-batch", "3-parts"])
def parts(request: pytest.FixtureRequest) -> Iterator[int]:
    """The fast path with the batch whole, and cut into three parts run on three threads (as
    on a 3-core machine), whatever this machine has."""
    with split_batch(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", ["ids", "dense"])
@pytest.mark.parametrize("initial", ["zero", "random"])
def test_cores_agree(dtype: torch.dtype, shape: tuple[int, ...], kind: str, initial: str, parts: int) -> None:
    steps, batch, num_inputs, num_hiddens, num_layers = shape
    reference, fused, cudnn = make_cores(num_inputs, num_hiddens, num_layers, dtype)
    X, state = make_inputs(steps, batch, num_inputs, num_hiddens, num_layers, dtype, kind, initial)
    weights = torch.randn(steps, batch, num_hiddens, dtype=dtype)
    expected = run(cudnn, X, state, weights)
    names = ["outputs", "final H", "final C", *(["dX"] if kind == "dense" else []), *(["dH0", "dC0"] if state else [])]
    tol = TOL[dtype]
    for scratch in (reference, fused):
        actual = run(scratch, X, state, weights)
        for name, a, e in zip(names, actual, expected, strict=True):
            assert_close(a, e, tol, f"{'fused' if scratch.fused else 'reference'} {name}")
        mapped = scratch_grads_as_cudnn(scratch)
        for name, p in cudnn.named_parameters():
            # nn.LSTM adds bias_ih and bias_hh: the gradient of each is the gradient of their sum, b.
            expected_grad = mapped[name.replace("bias_hh", "bias_ih")]
            assert_close(p.grad, expected_grad, tol, f"{'fused' if scratch.fused else 'reference'} d{name}")


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_gradcheck(fused: bool, kind: str, parts: int) -> None:
    """Analytic gradients of every parameter, the input and the initial state equal finite differences."""
    torch.manual_seed(0)
    steps, batch, num_inputs, num_hiddens, num_layers = 4, 3, 3, 3, 2
    core = ScratchLSTM(num_inputs, num_hiddens, num_layers, fused=fused).double()
    params = {name: (torch.randn_like(p) * 0.5).requires_grad_() for name, p in core.named_parameters()}
    names = list(params)
    X, (H0, C0) = make_inputs(steps, batch, num_inputs, num_hiddens, num_layers, torch.float64, kind, "random")

    def f(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tensors[0] if kind == "dense" else X
        H, C, *weights = tensors[1:] if kind == "dense" else tensors
        outputs, state = functional_call(core, dict(zip(names, weights)), (inputs, (H, C)))
        return outputs, *state

    tensors = ((X,) if kind == "dense" else ()) + (H0, C0, *params.values())
    assert gradcheck(f, tensors, eps=1e-6, atol=1e-7)


# ---- state carried across chunks ------------------------------------------------------------


@pytest.mark.parametrize("core_name", ["reference", "fused", "cudnn"])
def test_two_chunks_equal_one_run(core_name: str) -> None:
    """The final state of the first chunk, fed to the second, continues the sequence exactly."""
    reference, fused, cudnn = make_cores(10, 8, 2, torch.float64)
    core = {"reference": reference, "fused": fused, "cudnn": cudnn}[core_name]
    X = torch.randint(0, 10, (9, 3))
    whole, (H, C) = core(X)
    first, state = core(X[:4])
    second, (H2, C2) = core(X[4:], state)
    assert_close(torch.cat([first, second]), whole, 1e-12, "outputs")
    assert_close(H2, H, 1e-12, "H")
    assert_close(C2, C, 1e-12, "C")


# ---- one-hot input as a row selection -------------------------------------------------------


def test_row_selection_equals_one_hot_matmul() -> None:
    """X_t W_x for one-hot X_t is the row of W_x at the id: exactly the seed's one-hot product."""
    torch.manual_seed(0)
    vocab_size, num_hiddens = 28, 16
    W_x = torch.randn(vocab_size, num_hiddens)
    X = torch.randint(0, vocab_size, (5, 7))  # (batch, steps), the seed's layout
    literal = F.one_hot(X.T, vocab_size).float() @ W_x  # the seed: one-hot (steps, batch, vocab) times W
    assert torch.equal(project(X.T, W_x), literal)


@pytest.mark.parametrize("core_name", ["reference", "fused", "cudnn"])
def test_ids_equal_one_hot_vectors(core_name: str) -> None:
    reference, fused, cudnn = make_cores(10, 8, 2, torch.float64)
    core = {"reference": reference, "fused": fused, "cudnn": cudnn}[core_name]
    X = torch.randint(0, 10, (6, 4))
    by_id, (H, C) = core(X)
    by_vector, (H2, C2) = core(F.one_hot(X, 10).double())
    assert_close(by_id, by_vector, 1e-12, "outputs")
    assert_close(H, H2, 1e-12, "H")
    assert_close(C, C2, 1e-12, "C")


# ---- conversion ------------------------------------------------------------------------------


def test_conversion_round_trip_is_exact() -> None:
    reference, _, _ = make_cores(10, 8, 3, torch.float32)
    state = reference.state_dict()
    back = to_scratch(to_cudnn(state))
    assert back.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(back[name], value), name


# ---- refusing bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("core_name", ["reference", "fused", "cudnn"])
@pytest.mark.parametrize(
    ("X", "state", "message"),
    [
        (torch.zeros(4, 2, dtype=torch.long), (torch.zeros(2, 3, 8), torch.zeros(2, 2, 8)),
         "state H must be (2, 2, 8) (layers, batch, hiddens), got (2, 3, 8)"),
        (torch.zeros(4, 2, dtype=torch.long), (torch.zeros(2, 2, 8), torch.zeros(1, 2, 8)),
         "state C must be (2, 2, 8) (layers, batch, hiddens), got (1, 2, 8)"),
        (torch.zeros(4, 2, dtype=torch.long), (torch.zeros(2, 2, 8, dtype=torch.long),) * 2,
         "state H must be floating point, got torch.int64"),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(2, 2, 8), "state must be a tuple (H, C)"),
        (torch.zeros(4, 2, 9), None, "dense input must be (steps, batch, 10), got (4, 2, 9)"),
        (torch.zeros(4, 10), None, "dense input must be (steps, batch, 10), got (4, 10)"),
        (torch.zeros(4, 2, 1, dtype=torch.long), None, "id input must be (steps, batch), got (4, 2, 1)"),
        (torch.full((4, 2), 10), None, "ids must lie in [0, 10), got [10, 10]"),
        (torch.full((4, 2), -1), None, "ids must lie in [0, 10), got [-1, -1]"),
        (torch.zeros(4, 2, dtype=torch.bool), None, "input must be int64 or int32 ids or floating point, got torch.bool"),
    ],
    ids=["H-batch", "C-layers", "int-state", "not-tuple", "dense-width", "dense-2d", "ids-3d", "id-too-big",
         "id-negative", "bool"],
)
def test_bad_input_is_refused(core_name: str, X: torch.Tensor, state: State | None, message: str) -> None:
    reference, fused, cudnn = make_cores(10, 8, 2, torch.float32)
    core = {"reference": reference, "fused": fused, "cudnn": cudnn}[core_name]
    with pytest.raises(ShapeError, match=f"^{re.escape(message)}$"):
        core(X, state)


@pytest.mark.parametrize("core_name", ["reference", "fused", "cudnn"])
def test_int32_ids_work_like_int64(core_name: str) -> None:
    reference, fused, cudnn = make_cores(10, 8, 1, torch.float64)
    core = {"reference": reference, "fused": fused, "cudnn": cudnn}[core_name]
    X = torch.randint(0, 10, (5, 3))
    assert_close(core(X.int())[0], core(X)[0], 0.0, "outputs")


# ---- the fast path ---------------------------------------------------------------------------


def test_fast_path_is_one_autograd_node_per_layer() -> None:
    """The hand-written backward replaces the per-step graph: autograd records one node a layer."""
    _, fused, _ = make_cores(10, 8, 2, torch.float32)
    outputs, _ = fused(torch.randint(0, 10, (6, 3)))
    assert type(outputs.grad_fn).__name__ == "LSTMSequenceBackward"
    assert type(outputs.grad_fn.next_functions[0][0]).__name__ == "LSTMSequenceBackward"  # the layer below


@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_fast_path_with_dropout_equals_reference(kind: str) -> None:
    """Dropout between layers draws the same masks in both paths, so they stay equal."""
    reference, fused, _ = make_cores(10, 8, 3, torch.float64)
    reference.dropout = fused.dropout = 0.5
    X, state = make_inputs(6, 3, 10, 8, 3, torch.float64, kind, "random")
    weights = torch.randn(6, 3, 8, dtype=torch.float64)
    torch.manual_seed(7)
    expected = run(reference, X, state, weights)
    torch.manual_seed(7)
    actual = run(fused, X, state, weights)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, 1e-10)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, 1e-10, name)


def test_stacked_weights_follow_parameter_updates_without_autograd() -> None:
    """Generation runs without autograd and caches the stacked weights: an optimizer step or a
    load_state_dict between two calls must still be seen."""
    reference, fused, _ = make_cores(10, 8, 2, torch.float64)
    X = torch.randint(0, 10, (5, 2))
    with torch.no_grad():
        fused(X)  # fills the cache
    loss = fused(X)[0].sum()
    loss.backward()
    torch.optim.SGD(fused.parameters(), lr=0.1).step()
    reference.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert_close(fused(X)[0], reference(X)[0], 1e-12, "after an optimizer step")
        fused.load_state_dict({k: v * 0.5 for k, v in fused.state_dict().items()})
        reference.load_state_dict(fused.state_dict())
        assert_close(fused(X)[0], reference(X)[0], 1e-12, "after load_state_dict")


@pytest.mark.parametrize("steps", [1, 5], ids=["one-step", "sequence"])
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_fast_path_without_autograd_equals_reference(steps: int, kind: str) -> None:
    """Generation and evaluation skip the autograd Function (one step at a time, or a whole
    sequence): the same function still, state carried."""
    reference, fused, _ = make_cores(10, 8, 2, torch.float64)
    X, state = make_inputs(steps, 3, 10, 8, 2, torch.float64, kind, "random")
    with torch.no_grad():
        expected, (H, C) = reference(X, state)
        actual, (H2, C2) = fused(X, state)
    assert_close(actual, expected, 1e-12, "outputs")
    assert_close(H2, H, 1e-12, "H")
    assert_close(C2, C, 1e-12, "C")


# ---- bf16 under autocast ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ids", "dense"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_fast_path_under_bf16_autocast(kind: str, num_layers: int) -> None:
    """Under CPU bf16 autocast the products run in bf16 (the outputs come out bf16) while the
    state, the cell state and every gradient stay fp32 and close to the fp32 run."""
    _, fused, _ = make_cores(10, 16, num_layers, torch.float32)
    with torch.no_grad():  # gates of order one, as in training; bf16 keeps 8 bits of them
        for p in fused.parameters():
            p.mul_(0.5)
    X, state = make_inputs(12, 4, 10, 16, num_layers, torch.float32, kind, "random")
    weights = torch.randn(12, 4, 16)
    expected = run(fused, X, state, weights)
    expected_grads = [p.grad.clone() for p in fused.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, (H, C) = fused(X, state)
    assert outputs.dtype == torch.bfloat16
    assert H.dtype == C.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = run(fused, X, state, weights)
    for a, e, name in zip(actual, expected, ["outputs", "H", "C", "dX", "dH0", "dC0"]):
        assert a.dtype == e.dtype or name == "outputs", name
        assert_close(a.float(), e, 3e-2, f"bf16 {name}")
    for (name, p), e in zip(fused.named_parameters(), expected_grads):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, e, 3e-2, f"bf16 d{name}")


def test_autocast_off_is_fp32() -> None:
    _, fused, _ = make_cores(10, 8, 1, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        outputs, _ = fused(torch.randint(0, 10, (3, 2)))
    assert outputs.dtype == torch.float32


def test_changing_outputs_in_place_is_refused() -> None:
    """The backward reads the saved H_t, of which the outputs are views: autograd refuses an
    in-place change rather than let it corrupt the gradient."""
    _, fused, _ = make_cores(10, 8, 1, torch.float32)
    outputs, _ = fused(torch.randint(0, 10, (4, 2)))
    with pytest.raises(RuntimeError, match="modified inplace"):
        outputs.mul_(2)


def test_fast_path_equals_nn_lstm_at_the_d2l_size() -> None:
    """35 steps, batch 32, 28 ids, 256 hiddens, nn.LSTM's own initialisation: the sizes where
    the fast path's buffers and its one product for all weight gradients matter most."""
    torch.manual_seed(0)
    cudnn = CudnnLSTM(28, 256, 1)
    fused = ScratchLSTM(28, 256, 1)
    fused.load_state_dict(to_scratch(cudnn.state_dict()))
    X = torch.randint(0, 28, (35, 32))
    state = (torch.randn(1, 32, 256) * 0.5, torch.randn(1, 32, 256) * 0.5)
    weights = torch.randn(35, 32, 256)
    for a, e, name in zip(run(fused, X, state, weights), run(cudnn, X, state, weights), ["outputs", "H", "C"]):
        assert_close(a, e, 1e-5, name)
    mapped = scratch_grads_as_cudnn(fused)
    for name, p in cudnn.named_parameters():
        assert_close(p.grad, mapped[name.replace("bias_hh", "bias_ih")], 1e-5, f"d{name}")


# ---- regularization: DropConnect on W_h, dropout between layers --------------------------------


def test_dropconnect_mask_is_bernoulli_scaled_to_keep_the_expectation() -> None:
    """Each entry 0 or 1/(1 - p), dropped with probability p: E[W_h ⊙ M] = W_h."""
    torch.manual_seed(0)
    M = dropconnect_mask(64, 0.3, torch.empty(0))
    assert M.shape == (64, 256)
    assert M.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert (M == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)  # 16,384 draws: σ = 0.004
    assert M.mean().item() == pytest.approx(1.0, abs=0.03)


def mask_of(name: str, masks: list[torch.Tensor]) -> torch.Tensor | float:
    """The DropConnect mask of the scratch parameter `name`: layer K's for "layers.K.W_h", none (1) for W_x and b."""
    return masks[int(name.split(".")[1])] if name.endswith("W_h") else 1.0


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_dropconnect_runs_each_batch_on_W_h_times_one_new_mask(fused: bool, kind: str, parts: int) -> None:
    """A batch with DropConnect is the same core without it on W_h ⊙ M — one mask for every
    step (and row) of the batch, drawn from torch's generator, a new one the next batch — and
    W_x, b as they are; the gradient reaches W_h through the mask (dL/dW_h = dL/dW̃_h ⊙ M)."""
    reference, fast, _ = make_cores(10, 8, 2, torch.float64, weight_drop=0.4)
    core = fast if fused else reference
    X, state = make_inputs(6, 3, 10, 8, 2, torch.float64, kind, "random")
    weights = torch.randn(6, 3, 8, dtype=torch.float64)
    torch.manual_seed(3)
    batches = [run(core, X, state, weights) + tuple(p.grad for p in core.parameters()) for _ in range(2)]
    torch.manual_seed(3)
    masks = [[dropconnect_mask(8, 0.4, weights) for _ in range(2)] for _ in range(2)]  # a batch's masks: one a layer
    assert not torch.equal(masks[0][0], masks[1][0])
    plain = ScratchLSTM(10, 8, 2, fused=False).double()
    for batch, batch_masks in zip(batches, masks):
        plain.load_state_dict({name: v * mask_of(name, batch_masks) for name, v in core.state_dict().items()})
        expected = run(plain, X, state, weights)
        outputs, grads = batch[: len(expected)], batch[len(expected) :]
        for a, e in zip(outputs, expected, strict=True):
            assert_close(a, e, 1e-10)
        for (name, p), g in zip(plain.named_parameters(), grads):
            assert_close(g, p.grad * mask_of(name, batch_masks), 1e-10, f"d{name}")
    assert not torch.equal(batches[0][0], batches[1][0])  # a new mask, new outputs


@pytest.mark.parametrize("core_name", ["reference", "fused", "cudnn"])
def test_dropconnect_is_off_in_evaluation(core_name: str) -> None:
    """model.eval(): the core without DropConnect, deterministic, and no number drawn."""
    cores = make_cores(10, 8, 2, torch.float32, weight_drop=0.5)
    plain = make_cores(10, 8, 2, torch.float32)
    index = ["reference", "fused", "cudnn"].index(core_name)
    core = cores[index].eval()
    X = torch.randint(0, 10, (5, 3))
    rng = torch.get_rng_state()
    with torch.no_grad():
        first, second = core(X)[0], core(X)[0]
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(first, second)
        assert torch.equal(first, plain[index](X)[0])
        assert not torch.equal(first, core.train()(X)[0])


REGULARIZED = [
    pytest.param({"weight_drop": 0.3}, id="weight-drop"),
    pytest.param({"dropout": 0.4, "locked": True}, id="locked-between-layers"),
    pytest.param({"dropout": 0.4, "weight_drop": 0.3}, id="weight-drop-and-dropout"),
    pytest.param({"dropout": 0.4, "locked": True, "weight_drop": 0.3}, id="weight-drop-and-locked"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("regularization", REGULARIZED)
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_cores_agree_in_training_with_regularization(dtype: torch.dtype, regularization: dict[str, Any], kind: str, parts: int) -> None:
    """Same seed, same masks: DropConnect drawn in the scratch layout (Mᵀ for nn.LSTM's W_hᵀ),
    dropout between layers per element or locked; outputs, state and every gradient agree."""
    reference, fused, cudnn = make_cores(10, 8, 3, dtype, **regularization)
    X, state = make_inputs(7, 4, 10, 8, 3, dtype, kind, "random")
    weights = torch.randn(7, 4, 8, dtype=dtype)
    torch.manual_seed(11)
    expected = run(cudnn, X, state, weights)
    tol = TOL[dtype]
    for scratch in (reference, fused):
        torch.manual_seed(11)
        actual = run(scratch, X, state, weights)
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, tol, f"{'fused' if scratch.fused else 'reference'} output {i}")
        mapped = scratch_grads_as_cudnn(scratch)
        for name, p in cudnn.named_parameters():
            assert_close(p.grad, mapped[name.replace("bias_hh", "bias_ih")], tol, f"{'fused' if scratch.fused else 'reference'} d{name}")
    torch.manual_seed(12)
    assert not torch.equal(run(fused, X, state, weights)[0], expected[0])  # the masks do act


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


def test_stacked_weights_are_not_cached_for_a_masked_W_h() -> None:
    """Without autograd, a masked W_h (new every batch, its storage reusable by the next) is
    stacked afresh: the cache serves the parameter's own weights only."""
    _, fused, _ = make_cores(10, 8, 1, torch.float64)
    layer = fused.scratch_layers()[0]
    with torch.no_grad():
        own = layer.stacked(torch.float64, ids=True)
        assert layer.stacked(torch.float64, ids=True) is own  # cached
        for scale in (0.0, 2.0):
            masked = layer.stacked(torch.float64, ids=True, W_h=layer.W_h * scale)
            assert masked is not own
            assert_close(masked.W_hT[:8], (layer.W_h * scale).T[:8], 0.0, "W_hᵀ, i block")
        assert layer.stacked(torch.float64, ids=True) is own
