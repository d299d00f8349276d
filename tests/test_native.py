"""The compiled recurrence (lstmlm/native.py, csrc/recurrence.cpp) builds where a compiler is, and
its absence is never an error. (That each cell's kernel computes what its equations and torch's
module compute is tests/test_cells.py's.)

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

from lstmlm import cells, native
from lstmlm.cells.cores import ScratchCore, TorchCore
from lstmlm.model import torch_to_scratch

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


def scratch_and_torch(num_inputs: int, hiddens: int, layers: int, path: str = "auto") -> tuple[ScratchCore, TorchCore]:
    torch.manual_seed(0)
    lstm = cells.get("lstm")
    torch_core = TorchCore(lstm, num_inputs, hiddens, layers)
    with torch.no_grad():
        for p in torch_core.parameters():
            p.normal_(0.0, 0.3)
    scratch = ScratchCore(lstm, num_inputs, hiddens, layers, path=path)
    converted = torch_to_scratch({f"core.{k}": v for k, v in torch_core.state_dict().items()}, lstm)
    scratch.load_state_dict({k.removeprefix("core."): v for k, v in converted.items()})
    return scratch, torch_core


@needs_build
def test_the_build_succeeds_where_there_is_a_compiler() -> None:
    assert native.status() == "compiled (C++)"
    assert native.recurrence() is not None


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
    scratch, torch_core = scratch_and_torch(12, 16, 1)
    assert scratch.path == "fused"  # the LSTM's Python fast path, chosen when it is built
    X = torch.randint(0, 12, (5, 3))
    assert_close(scratch(X)[0], torch_core(X)[0], 1e-5, "outputs")


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


