"""The training step as a CUDA graph: the scratch core's many small kernels launched as one.

The scratch core runs about 13 kernels per time step and layer, each a few microseconds of GPU
work behind as long a launch: at d2l's size a batch is some 555 launches, ~2.7 ms of the host's
time whatever the GPU. A CUDA graph records a whole training step once — forward, loss,
backward, clipping, the optimizer's update — and replays it as one launch. By construction
that needs

- static buffers (`Buffers`): a graph reads and writes fixed addresses, so each step copies its
  batch and starting state in, and its loss and final state are read from there (valid until
  the next step);
- an optimizer that can be captured: fused SGD, or Adam/AdamW built `capturable` (their step
  count on the device); and the learning rate as a device tensor, which the schedule fills in
  place each step — a Python float would be frozen into the graph (`learning_rate_on_device`);
- nothing in the step that waits for the host: no `.item()`, no id checks (`checks_ids` is
  off on a GPU), no shape that depends on data.

`GraphedStep` runs the first WARMUP steps eagerly (on a side stream, as torch's documentation
asks: cuBLAS's workspaces and autograd's state are made then), records the next and replays it
from then on; a batch of another shape runs eagerly. Where a graph would pay but cannot hold
the step (`why_eager`: DistributedDataParallel, dropout) or recording fails, every step runs
eagerly, and the trainer says so once.

The recording itself is behind `Capture`: `CudaGraph` on a GPU; tests, on a CPU, pass a capture
that keeps the body and runs it at each replay, which exercises everything here but the graph.

torch.compile is not used: it belongs where a measurement shows it pays, and this code was
written on machines without a GPU to measure on (`benchmarks/gpu_check.py` times the graph).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from .cells.base import State

WARMUP = 3  # eager steps before recording, as torch's documentation does for whole-network capture
_T = TypeVar("_T")

Step = Callable[[torch.Tensor, torch.Tensor, State | None], tuple[torch.Tensor, State]]  # (X, Y, state) → (loss, state)


def pays(device: torch.device, path: str) -> bool:
    """Whether a graph is worth having: the scratch core's fused path on CUDA, a dozen small
    kernels a step. (A CPU has no graphs, and torch's cuDNN core is already a few large kernels a
    layer.)"""
    return device.type == "cuda" and path == "fused"


def why_eager(draws: bool, distributed: bool) -> str | None:
    """Why a step that would pay as a graph must run eagerly, or None when it can be one;
    `draws`: the step draws random numbers (dropout of any kind, DropConnect)."""
    if distributed:
        return "under DistributedDataParallel (capturing its all-reduce takes NCCL settings and a longer warm-up, not made here)"
    if draws:
        return "dropout draws random numbers, which this graph has not been checked to draw as the eager step does"
    return None


class Capture(Protocol):
    """How a step is recorded and replayed."""

    def warm_up(self, step: Callable[[], _T]) -> _T: ...

    def record(self, body: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CudaGraph:
    """A `torch.cuda.CUDAGraph`: warm-up steps on a side stream, the body recorded (not run), replays."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph = torch.cuda.CUDAGraph()
        self.side = torch.cuda.Stream(device)

    def warm_up(self, step: Callable[[], _T]) -> _T:
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            result = step()
        main.wait_stream(self.side)
        return result

    def record(self, body: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class Buffers:
    """What the graph reads and writes: the batch and the state it starts from, the loss and
    the state it ends in."""

    X: torch.Tensor  # (batch, steps) ids
    Y: torch.Tensor  # (batch, steps) ids
    start: State  # the state the step starts from, each (layers, batch, hiddens)
    loss: torch.Tensor  # ()
    end: State  # the state it ends in

    @classmethod
    def like(cls, X: torch.Tensor, Y: torch.Tensor, state_shape: tuple[int, int, int], states: int) -> Buffers:
        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, device=X.device)

        start, end = (tuple(zeros(state_shape) for _ in range(states)) for _ in range(2))
        return cls(torch.empty_like(X), torch.empty_like(Y), start, zeros(()), end)

    def load(self, X: torch.Tensor, Y: torch.Tensor, state: State | None) -> None:
        """A step's inputs into place; no state is the zero state (an epoch's first batch)."""
        self.X.copy_(X)
        self.Y.copy_(Y)
        for buffer, S in zip(self.start, state or [None] * len(self.start)):
            if S is None:
                buffer.zero_()
            else:
                buffer.copy_(S)


class GraphedStep:
    """`step` — forward, loss, backward, clip, update — recorded once and replayed each batch.

    Called as the step is, `(X, Y, state) → (loss, state)`; the loss and state it returns are
    its buffers, which the next call overwrites. `failure` says why recording failed (then every
    step runs eagerly). After each replay the parameters' version counters are moved on: a
    replay updates them in place where autograd cannot see it, and version counters are what
    caches of the weights (`ScratchLayer.stacked`) and autograd's own checks go by. `states`: how
    many tensors the cell's state holds."""

    def __init__(
        self, step: Step, optimizer: torch.optim.Optimizer, state_shape: tuple[int, int, int], states: int, capture: Capture, warmup: int = WARMUP
    ) -> None:
        self.step, self.optimizer, self.state_shape, self.states, self.capture, self.warmup = step, optimizer, state_shape, states, capture, warmup
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.warmed = 0
        self.buffers: Buffers | None = None
        self.failure: str | None = None
        self.replays = 0

    def __call__(self, X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        if self.failure is not None:
            return self.step(X, Y, state)
        if self.buffers is None:
            if self.warmed < self.warmup:
                self.warmed += 1
                return self.capture.warm_up(lambda: self._eager(X, Y, state))
            if not self._record(X, Y):
                return self.step(X, Y, state)
        buffers = self.buffers
        assert buffers is not None
        if X.shape != buffers.X.shape or Y.shape != buffers.Y.shape:
            return self.step(X, Y, state)
        buffers.load(X, Y, state)
        self.capture.replay()
        self.replays += 1
        torch.autograd.graph.increment_version(self.params)
        return buffers.loss, buffers.end

    def _eager(self, X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        with warnings.catch_warnings():  # a capturable Adam warns when it steps outside a graph: here it is meant to
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            return self.step(X, Y, state)

    def _record(self, X: torch.Tensor, Y: torch.Tensor) -> bool:
        """Make the buffers and record the step on them; False (and `failure`) when that fails."""
        learning_rate_on_device(self.optimizer, X.device)
        buffers = Buffers.like(X, Y, self.state_shape, self.states)

        def body() -> None:
            loss, state = self.step(buffers.X, buffers.Y, buffers.start)
            buffers.loss.copy_(loss)
            for buffer, S in zip(buffers.end, state):
                buffer.copy_(S)

        try:
            self.capture.record(body)
        except RuntimeError as e:  # what torch raises for work that a graph cannot hold
            first_line = (str(e).splitlines() or [""])[0]
            self.failure = f"recording it failed ({type(e).__name__}: {first_line})"
            return False
        self.buffers = buffers
        return True


def learning_rate_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Each parameter group's learning rate as a 0-dim tensor on `device` (once): a graph reads
    it at each replay, and the schedule writes it in place (`fill_`, no sync)."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
