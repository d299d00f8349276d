"""The compiled recurrence (lstmlm/native.py, csrc/recurrence.cpp) computes what the Python loop
computes, and its absence is never an error.

Where a C++ compiler is present (CI's machine has one) the build must succeed: a failing build
would silently leave every user on the slower loop, so it fails here instead.
"""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import native
from lstmlm.fused import split_batch
from lstmlm.lstm import CudnnLSTM, ScratchLSTM, State
from lstmlm.model import cudnn_to_scratch

from conftest import assert_close

HAS_COMPILER = shutil.which("c++") is not None or shutil.which("g++") is not None
needs_build = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine: the fast path runs its Python loop")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """native as on a machine where nothing was built yet: its own cache directory, nothing
    loaded (the session's build is restored afterwards)."""
    monkeypatch.setenv("LSTMLM_NATIVE_DIR", str(tmp_path / "native"))
    native._load.cache_clear()
    yield tmp_path / "native"
    native._load.cache_clear()


def scratch_and_cudnn(num_inputs: int, hiddens: int, layers: int) -> tuple[ScratchLSTM, CudnnLSTM]:
    torch.manual_seed(0)
    cudnn = CudnnLSTM(num_inputs, hiddens, layers)
    with torch.no_grad():
        for p in cudnn.parameters():
            p.normal_(0.0, 0.3)
    scratch = ScratchLSTM(num_inputs, hiddens, layers)
    converted = cudnn_to_scratch({f"core.{k}": v for k, v in cudnn.state_dict().items()})
    scratch.load_state_dict({k.removeprefix("core."): v for k, v in converted.items()})
    return scratch, cudnn


def forward_backward(core: torch.nn.Module, X: torch.Tensor, state: State, weights: torch.Tensor) -> list[torch.Tensor]:
    """Outputs, final state and the gradient of every parameter, input and initial state."""
    core.zero_grad()
    for t in (X, *state):
        t.grad = None
    outputs, (H, C) = core(X, state)
    ((outputs.float() * weights).sum() + H.sum() + (C * C).sum()).backward()
    grads = [p.grad for p in core.parameters()]
    return [outputs.float(), H, C, *grads, *(t.grad for t in (X, *state) if t.grad is not None)]


def inputs(kind: str, steps: int, batch: int, num_inputs: int, hiddens: int, layers: int) -> tuple[torch.Tensor, State, torch.Tensor]:
    torch.manual_seed(1)
    X = torch.randint(0, num_inputs, (steps, batch)) if kind == "ids" else torch.randn(steps, batch, num_inputs, requires_grad=True)
    state = (torch.randn(layers, batch, hiddens, requires_grad=True), torch.randn(layers, batch, hiddens, requires_grad=True))
    return X, state, torch.randn(steps, batch, hiddens)


@needs_build
def test_the_build_succeeds_where_there_is_a_compiler() -> None:
    assert native.status() == "compiled (C++)"
    assert native.recurrence() is not None


@needs_build
@pytest.mark.parametrize("kind", ["ids", "dense"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("parts", [1, 3], ids=["whole-batch", "3-parts"])
def test_compiled_equals_python_loop_and_nn_lstm(kind: str, layers: int, parts: int) -> None:
    """fp32: the compiled recurrence, the Python loop and nn.LSTM agree in outputs, state and
    every gradient to 1e-5, the batch whole or cut into parts run on threads."""
    scratch, cudnn = scratch_and_cudnn(12, 16, layers)
    X, state, weights = inputs(kind, 9, 7, 12, 16, layers)
    with split_batch(parts):
        compiled = forward_backward(scratch, X, state, weights)
        with native.disabled():
            loop = forward_backward(scratch, X, state, weights)
    for k, (a, e) in enumerate(zip(compiled, loop, strict=True)):
        assert_close(a, e, 1e-5, f"compiled vs loop, tensor {k}")
    outputs, (H, C) = cudnn(X, state)
    assert_close(compiled[0], outputs, 1e-5, "outputs vs nn.LSTM")
    assert_close(compiled[1], H, 1e-5, "H vs nn.LSTM")
    assert_close(compiled[2], C, 1e-5, "C vs nn.LSTM")


@needs_build
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_compiled_under_bf16_is_close_to_fp32(kind: str) -> None:
    """bf16 products (8 bits of mantissa), the cell and every gradient in fp32: within 3e-2 of
    the fp32 run, as the Python loop is (tests/test_lstm.py), and in the same dtypes."""
    scratch, _ = scratch_and_cudnn(12, 16, 2)
    with torch.no_grad():
        for p in scratch.parameters():
            p.mul_(0.5)
    X, state, weights = inputs(kind, 9, 7, 12, 16, 2)
    expected = forward_backward(scratch, X, state, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs, (H, C) = scratch(X, state)
        actual = forward_backward(scratch, X, state, weights)
    assert outputs.dtype == torch.bfloat16 and H.dtype == C.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in scratch.parameters())
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, 3e-2, f"bf16 vs fp32, tensor {k}")


@needs_build
def test_compiled_equals_nn_lstm_at_the_d2l_size() -> None:
    """35 steps, batch 32, 28 ids, 256 hiddens, split across the cores as training runs it."""
    scratch, cudnn = scratch_and_cudnn(28, 256, 1)
    with torch.no_grad():
        for p in (*scratch.parameters(), *cudnn.parameters()):
            p.mul_(0.2)
    X, state, weights = inputs("ids", 35, 32, 28, 256, 1)
    compiled = forward_backward(scratch, X, state, weights)
    expected = forward_backward(cudnn, X, state, weights)
    for k in range(3):  # outputs, H, C; the gradients' layouts differ (tests/test_lstm.py maps them)
        assert_close(compiled[k], expected[k], 1e-5, f"tensor {k}")
    with native.disabled():
        loop = forward_backward(scratch, X, state, weights)
    for k, (a, e) in enumerate(zip(compiled, loop, strict=True)):
        assert_close(a, e, 1e-5, f"compiled vs loop, tensor {k}")


@needs_build
def test_a_second_process_finds_the_build(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load builds into the cache; a later one (a new process: the load cache cleared)
    takes the file as it is and runs no compiler."""
    assert native.status() == "compiled (C++)"
    built = list(fresh.glob("recurrence-*.so"))
    assert len(built) == 1 and not list(fresh.glob(".recurrence-*")), "one library, no temporary left"
    run = native.subprocess.run

    def only_the_version(command: list[str], **kwargs: Any) -> Any:
        assert "--version" in command, f"the compiler ran: {command}"  # the cache key asks for it
        return run(command, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", only_the_version)
    compiler = shutil.which("c++") or shutil.which("g++")
    assert compiler is not None
    assert native._build(compiler) == built[0]


def test_without_a_compiler_the_python_loop_runs(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(fresh / "no-such-compiler"))
    assert native.recurrence() is None
    assert native.status().startswith("python loop (")
    scratch, cudnn = scratch_and_cudnn(12, 16, 1)
    X, state, _ = inputs("ids", 5, 3, 12, 16, 1)
    assert_close(scratch(X, state)[0], cudnn(X, state)[0], 1e-5, "outputs")


def test_a_failing_build_is_a_reason_not_an_error(fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiler = tmp_path / "broken-c++"
    compiler.write_text("#!/bin/sh\necho 'recurrence.cpp:1:1: error: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(compiler))
    assert native.recurrence() is None
    assert native.status() == "python loop (the C++ build failed: recurrence.cpp:1:1: error: this compiler is broken)"
    assert not list(fresh.glob("*.so")) and not list(fresh.glob(".recurrence-*")), "nothing half-built is left"


def test_switched_off_by_the_environment(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTMLM_NATIVE", "0")
    assert native.recurrence() is None
    assert native.status() == "python loop (LSTMLM_NATIVE=0)"
    assert not fresh.exists(), "nothing was built"


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ids", "dense"])
def test_the_units_cut_across_threads_compute_what_one_thread_does(dtype: torch.dtype, kind: str) -> None:
    """The compiled recurrence cuts every step by hidden units, a part a thread meeting the
    others once a step: three parts give one part's gates, states and gradients."""
    from lstmlm import fused
    from lstmlm.lstm import ScratchLSTMLayer

    torch.manual_seed(0)
    layer = ScratchLSTMLayer(12, 96)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)
    X = torch.randint(0, 12, (9, 8)) if kind == "ids" else torch.randn(9, 8, 12)
    H_0, C_0 = torch.randn(8, 96), torch.randn(8, 96)
    weights = fused.stack_weights(layer.W_x, layer.W_h, layer.b, dtype, ids=kind == "ids")
    W_h = fused.as_dtype(layer.W_h.detach(), dtype).contiguous()
    dHs, dC_T = torch.randn(9, 96, 8), torch.randn(8, 96)
    results = {}
    threads = torch.get_num_threads()
    try:
        for parts in (1, 3):  # 96 units: three parts of 32
            torch.set_num_threads(parts)
            seq = fused.run_sequence(X, H_0, C_0, weights, torch.float32)
            results[parts] = [*seq, *fused.recurrence_backward(dHs, dC_T, seq.gates, seq.Cs, seq.tanh_C, W_h)]
    finally:
        torch.set_num_threads(threads)
    for k, (a, e) in enumerate(zip(results[3], results[1], strict=True)):
        assert_close(a.float(), e.float(), 1e-5 if dtype == torch.float32 else 2e-2, f"tensor {k}")
