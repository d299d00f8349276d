"""A GPU's constraints met on a CPU: the host waits a GPU would make counted (`host_syncs`), the
checks that read values on the host turned off as on a GPU (`as_on_a_gpu`), and a CUDA graph's
recording and replay stood in for (`Replayed`, `graphs_on_the_cpu`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

HOST_READS = ("tolist", "numpy", "cpu")  # tensor methods that copy values to the host (no aten op of their own)


@contextlib.contextmanager
def host_syncs() -> Iterator[list[str]]:
    """Within the block, every operation that would make the host wait for a GPU, by name, on
    any device: reading a value (item, bool, float, int: aten._local_scalar_dense) and the
    methods that copy to the host. (A wait inside one kernel is not seen, as none is inside
    the step on a GPU: F.one_hot checks values only on a CPU — `as_on_a_gpu` — and sampling
    avoids torch.multinomial, which checks its input on the host on every device.)"""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                seen.append("item")
            return func(*args, **(kwargs or {}))

    def counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            return method(self, *args, **kwargs)

        return read

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counted(name, method))
        with ScalarReads():
            yield seen
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks that read values on the host on a CPU only, off as on a GPU: lstmlm's id
    checks (`device.checks_ids`) and F.one_hot's range check (on CUDA left to scatter's
    device-side assert)."""
    import torch
    import torch.nn.functional as F

    from lstmlm import model
    from lstmlm.cells import cores

    for module in (cores, model):
        monkeypatch.setattr(module, "checks_ids", lambda X: False)

    def one_hot(X: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
        assert num_classes > 0  # lstmlm always says how many: finding out would read the maximum
        return torch.zeros((*X.shape, num_classes), dtype=torch.int64, device=X.device).scatter_(-1, X.unsqueeze(-1), 1)

    monkeypatch.setattr(F, "one_hot", one_hot)


class Replayed:
    """A `graphs.Capture` that runs on a CPU: recording keeps the body without running it (as a
    CUDA graph's does), each replay runs it. Everything of a graphed step but the graph."""

    def __init__(self, device: object = None) -> None:
        self.body: Callable[[], None] | None = None
        self.recorded = 0

    def warm_up(self, step: Callable[[], Any]) -> Any:
        return step()

    def record(self, body: Callable[[], None]) -> None:
        self.body, self.recorded = body, self.recorded + 1

    def replay(self) -> None:
        assert self.body is not None
        self.body()


def graphs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainers the command line builds from here on graph the scratch core's step on the CPU,
    with `Replayed` in the CUDA graph's place (a Trainer built in a test takes `capture=` instead)."""
    from lstmlm import graphs

    monkeypatch.setattr(graphs, "pays", lambda device, path: path in ("fused", "compiled"))
    monkeypatch.setattr(graphs, "CudaGraph", Replayed)
