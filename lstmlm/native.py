"""The scratch LSTM's recurrence compiled for this machine's CPU (`csrc/recurrence.cpp`).

The fast path's Python loop (`fused.forward_steps`, `fused.backward_steps`) issues a dozen torch
operations a time step, each as long as its arithmetic at batch 32, and holds the GIL between
them, so the parts of a batch that `fused.batch_parts` gives each core wait on each other. The
C++ file computes the same — one matrix product (torch's) and one vectorized pass over the
gates a step — in one call per layer and sequence that runs without the GIL.

It is compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`) against the
installed torch, for this CPU (`-march=native`), and kept in `$LSTMLM_NATIVE_DIR` (default
`$LSTMLM_HOME/native`, `~/.cache/lstmlm/native`) under a name that changes with the source,
torch, the compiler and the CPU, so a cache shared between machines never loads a build made for
another. Building takes some 10-20 seconds, once. Without a compiler, or if the build or the
load fails, or with `LSTMLM_NATIVE=0`, the fast path runs its Python loop: the same function,
slower; `status()` says which and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .corpus import cache_dir

DRIVER = Path(__file__).with_name("csrc") / "recurrence.cpp"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++20", "-shared", "-fPIC")
BUILD_SECONDS = 600  # a compiler that takes longer is given up on

_lock = threading.Lock()
_loaded: Path | None = None  # the library this process loaded
_enabled = True  # tests switch the compiled recurrence off to compare it with the Python loop


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, the fast path runs its Python loop even where the build is loaded."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def recurrence() -> Any | None:
    """`torch.ops.lstmlm_recurrence` (forward, backward), built and loaded on first call; None
    where it cannot be, is switched off, or torch is not on a CPU build that has it."""
    if not _enabled:
        return None
    return _load()[0]


def needs_build() -> bool:
    """Whether the next `recurrence()` will compile (some 10-20 s): nothing loaded in this
    process yet, none built for this source, torch, compiler and CPU in the cache."""
    if _load.cache_info().currsize or not _enabled or os.environ.get("LSTMLM_NATIVE", "1") == "0":
        return False
    compiler = _compiler()
    return compiler is not None and not (_directory() / f"recurrence-{_key(compiler)}.so").is_file()


def status() -> str:
    """"compiled" or "python loop" and, for the latter, why: for `lstmlm bench` and the tests."""
    ops, reason = _load()
    return "compiled (C++)" if ops is not None else f"python loop ({reason})"


@lru_cache(maxsize=1)
def _load() -> tuple[Any | None, str]:
    if os.environ.get("LSTMLM_NATIVE", "1") == "0":
        return None, "LSTMLM_NATIVE=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found: set CXX or install g++"
    global _loaded
    with _lock:
        try:
            library = _build(compiler)
            if _loaded is None:  # a namespace registers once a process: a second build's library would abort it
                torch.ops.load_library(str(library))
                _loaded = library
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return None, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return torch.ops.lstmlm_recurrence, ""


def source() -> str:
    """What is compiled: the driver every cell shares, then each registered cell's kernel."""
    from . import cells

    kernels = [f"// ---- {cell.name} (lstmlm/cells) ----\n{cell.kernel}" for cell in cells.every() if cell.kernel is not None]
    return "\n".join([DRIVER.read_text(encoding="utf-8"), *kernels])


def usable(build: bool = True) -> bool:
    """Whether the compiled recurrence can run here: loaded (building it first if `build`), or,
    without `build`, switched on with a compiler to build it (the caller builds it later)."""
    if build:
        return recurrence() is not None
    return _enabled and os.environ.get("LSTMLM_NATIVE", "1") != "0" and (_load.cache_info().currsize > 0 or _compiler() is not None)


def _build(compiler: str) -> Path:
    """The compiled library for this source, torch, compiler and CPU: from the cache, or built
    into it (into a temporary name first, then renamed, so two processes building at once
    each leave a whole file)."""
    directory = _directory()
    library = directory / f"recurrence-{_key(compiler)}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    torch_dir = Path(torch.__file__).parent
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".recurrence-", suffix=".so")
    os.close(fd)
    code = Path(temporary).with_suffix(".cpp")
    code.write_text(source(), encoding="utf-8")
    command = [
        compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", str(code), "-o", temporary,
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS, check=False)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["no output"]
            raise RuntimeError(f"the C++ build failed: {errors[0]}")
        os.replace(temporary, library)
    finally:
        for leftover in (temporary, code):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return library


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _directory() -> Path:
    return Path(os.environ.get("LSTMLM_NATIVE_DIR") or cache_dir() / "native")


def _key(compiler: str) -> str:
    """What the build depends on: the source, torch, Python, the compiler and this CPU."""
    h = hashlib.sha1(source().encode())
    h.update(" ".join((torch.__version__, sys.version, platform.machine(), compiler, *FLAGS)).encode())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        h.update(subprocess.run([compiler, "--version"], capture_output=True, timeout=60, check=False).stdout)
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()
