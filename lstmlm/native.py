"""The scratch cells' recurrences compiled for this machine's CPU (`csrc/recurrence.cpp`).

Run in Python, a recurrence issues a dozen torch operations a time step, each as long as its
arithmetic at batch 32, and holds the GIL between them. The compiled one computes the same —
one matrix product (torch's) and one vectorized pass over the gates a step — in one call per
layer and sequence that runs without the GIL. The source is the driver in `csrc/recurrence.cpp`
(the time loop, forward, backward, a generation step and greedy decoding, written once) followed
by each cell's kernel (its gates at one time step, `Cell.kernel` in `lstmlm/cells/`), which
registers `forward_<cell>`, `backward_<cell>`, `step_<cell>` and `greedy_<cell>`.

It is compiled on first use with the machine's C++ compiler (`$CXX`, split as a shell splits it,
so `ccache g++` and `g++ -O2` work; else `c++`) against the installed torch, for this CPU
(`-march=native`), and kept in `$LSTMLM_NATIVE_DIR` (default `$LSTMLM_HOME/native`,
`~/.cache/lstmlm/native`) under a name that changes with the source, torch, the compiler and the
CPU, so a cache shared between machines never loads a build made for another. It is built once
per source, torch, compiler and CPU; training says when it builds.

What is loaded runs inside this process, so the cache is trusted only as far as trust.py
allows (a private directory, each library matching its manifest): a directory refused leaves
the Python loop running, a library that does not match is built again, and one that loads but
lacks the ops leaves the Python loop running.
One process builds a given library at a time (a lock the kernel drops when its holder dies),
in a scratch directory beside it, with the compiler's own temporary files; what a killed build
leaves there the next build removes.

Without a compiler, where the build or the load fails, or the cache is refused, or with
`LSTMLM_NATIVE=0`, the fast path runs its Python loop: the same function, slower; `status()` says
which and why (training prints that as one warning).

Why a build of our own rather than `torch.utils.cpp_extension.load`: that one needs ninja, trusts
whatever its build directory holds (no check of the library against what was built, nor of who
may write there), and its lock is a file that a killed build leaves behind, on which every later
process then waits forever. An ahead-of-time extension built by `pip install` would bind the
wheel to one torch's C++ ABI and need runtime dispatch across CPU features where
`-march=native` now serves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .atomic import publish
from .data.home import cache_dir
from .trust import Untrusted, check_directory, intact, private_directory, write_manifest

DRIVER = Path(__file__).with_name("csrc") / "recurrence.cpp"  # the driver every cell shares; each cell adds its kernel
CHOOSER = DRIVER.with_name("choosing.cpp")  # generation's choice of the next character, after the kernels
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-std=c++20", "-shared", "-fPIC")
OPS = ("forward", "backward", "step", "greedy", "sample")  # each cell's, as `{op}_{cell}`: what recurrence.py and generate.py call
SHARED_OPS = ("choose", "sum_by_id", "pack")  # every cell's: what choosing.py and recurrence.py call
BUILD_SECONDS = 600  # a compiler that takes longer is given up on; a scratch directory older than this is a killed build's
SCRATCH = ".recurrence-"  # how a build's scratch directory is named (and an older version's temporary files were)
FULL_DISK = ("No space left on device", "Disk quota exceeded")  # what a compiler says when it cannot write

_lock = threading.Lock()
_loaded: Path | None = None  # the library this process loaded
_enabled = True  # tests switch the compiled recurrence off to compare it with the Python loop


class _Unavailable(Exception):
    """Why the compiled recurrence cannot be had here; its message is `status()`'s reason."""


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
    """`torch.ops.lstmlm_recurrence` (forward, backward, step, greedy), built and loaded on first
    call; None where it cannot be, is switched off, or torch is not on a CPU build that has it."""
    if not _enabled:
        return None
    return _load()[0]


def loaded() -> Any | None:
    """`recurrence()` where this process has loaded it already, else None: for a caller that
    uses the compiled ops where they are at hand but should never wait for a build."""
    if not _enabled or not _load.cache_info().currsize:
        return None
    return _load()[0]


def needs_build() -> bool:
    """Whether the next `recurrence()` will compile: nothing loaded in this
    process yet, and no intact build for this source, torch, compiler and CPU in the cache."""
    if _load.cache_info().currsize or not _enabled or os.environ.get("LSTMLM_NATIVE", "1") == "0":
        return False
    try:
        compiler, directory = _compiler(), _directory()
        if directory.exists():
            check_directory(directory)
    except (_Unavailable, Untrusted):
        return False
    return not intact(*_paths(directory, compiler))


def unavailable() -> str:
    """Why the compiled recurrence cannot run here ("" where it can)."""
    return _load()[1]


def failed() -> bool:
    """Whether this process tried to load (or build) the compiled recurrence and could not,
    while it was switched on (LSTMLM_NATIVE=0 and the tests' switch are choices, not failures)."""
    if not _enabled or os.environ.get("LSTMLM_NATIVE", "1") == "0" or not _load.cache_info().currsize:
        return False
    return _load()[0] is None


def status() -> str:
    """ "compiled" or "python loop" and, for the latter, why: for `lstmlm bench` and the tests."""
    ops, reason = _load()
    return "compiled (C++)" if ops is not None else f"python loop ({reason})"


@lru_cache(maxsize=1)
def _load() -> tuple[Any | None, str]:
    if os.environ.get("LSTMLM_NATIVE", "1") == "0":
        return None, "LSTMLM_NATIVE=0"
    global _loaded
    with _lock:
        try:
            library = _build(_compiler())
            if _loaded is None:  # a namespace registers once a process: a second build's library would abort it
                torch.ops.load_library(str(library))
                _loaded = library
        except (_Unavailable, Untrusted) as e:
            return None, str(e)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            return None, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    missing = [op for op in _ops() if not hasattr(torch.ops.lstmlm_recurrence, op)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return None, f"{_loaded} loaded but lacks the op {missing[0]}{more}: remove it to build it again"
    return torch.ops.lstmlm_recurrence, ""


def source() -> str:
    """What is compiled: the driver every cell shares, each registered cell's kernel, then the
    choice of the next character."""
    kernels = [f"// ---- {cell.name} (lstmlm/cells) ----\n{cell.kernel}" for cell in _compiled_cells()]
    return "\n".join([DRIVER.read_text(encoding="utf-8"), *kernels, CHOOSER.read_text(encoding="utf-8")])


def usable(build: bool = True) -> bool:
    """Whether the compiled recurrence can run here: loaded (building it first if `build`), or,
    without `build`, switched on with a compiler to build it (the caller builds it later)."""
    if build:
        return recurrence() is not None
    if not _enabled or os.environ.get("LSTMLM_NATIVE", "1") == "0":
        return False
    if _load.cache_info().currsize:
        return _load()[0] is not None
    try:
        _compiler()
    except _Unavailable:
        return False
    return True


def _compiled_cells() -> list[Any]:
    from . import cells  # the registry imports no torch; its cells import this module's callers

    return [cell for cell in cells.every() if cell.kernel is not None]


def _ops() -> list[str]:
    return [f"{op}_{cell.name}" for cell in _compiled_cells() for op in OPS] + list(SHARED_OPS)


# ---- the build ----------------------------------------------------------------------------------


def _build(compiler: list[str]) -> Path:
    """The compiled library for this source, torch, compiler and CPU: from the cache where it is
    intact, else built into it — in a scratch directory, then renamed into place, its manifest
    last, so a reader finds the whole library and its manifest or builds it again."""
    directory = private_directory(_directory())
    library, manifest = _paths(directory, compiler)
    if intact(library, manifest):
        return library
    try:
        with _locked(library.with_suffix(".lock")):
            if intact(library, manifest):  # another process built it while this one waited
                return library
            _sweep(directory, library.stem)
            with tempfile.TemporaryDirectory(prefix=f".{library.stem}-", dir=directory) as scratch:
                _install(_compile(compiler, Path(scratch)), library, manifest, compiler)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _Unavailable(f"the C++ build failed: no space left on device in {directory}") from None
        raise _Unavailable(f"the C++ build failed in {directory}: {e.strerror or e}") from None
    return library


def _compile(compiler: list[str], scratch: Path) -> Path:
    """Run the compiler in its own process group, its temporary files in `scratch`: a timeout or
    an interrupt kills it whole (the driver, cc1plus, the linker), and a kill of this process
    leaves nothing outside `scratch`."""
    torch_dir = Path(torch.__file__).parent
    output = scratch / "recurrence.so"
    code = scratch / "recurrence.cpp"
    code.write_text(source(), encoding="utf-8")
    command = [
        *compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}", str(code), "-o", str(output),
        f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(scratch)}
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", env=env, start_new_session=True,
        )  # fmt: skip
    except OSError as e:
        raise _Unavailable(f"cannot run the C++ compiler {compiler[0]}: {e.strerror or e}") from None
    try:
        said, _ = process.communicate(timeout=BUILD_SECONDS)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise _Unavailable(f"the C++ build took over {BUILD_SECONDS} s: given up") from None
    except BaseException:
        _kill(process)
        raise
    if process.returncode != 0 or not output.is_file():
        raise _Unavailable(f"the C++ build failed: {_diagnosis(said, scratch.parent)}")
    return output


def _install(built: Path, library: Path, manifest: Path, compiler: list[str]) -> None:
    """Rename `built` to `library`, then write its manifest (size, SHA-256) beside it: written in
    the scratch directory, fsynced, renamed. Between the two renames a reader finds the old
    manifest, which no longer matches, and waits on the lock."""
    os.chmod(built, 0o755)  # the linker's mode follows the umask; a group-writable library would be refused
    written = built.with_name(manifest.name)
    write_manifest(built, written, source=str(DRIVER), compiler=compiler)
    os.replace(built, library)
    publish(written, manifest)


def _diagnosis(said: str, directory: Path) -> str:
    """The compiler's one line that says what went wrong; a full disk said as such."""
    lines = said.splitlines()
    if any(words in line for line in lines for words in FULL_DISK):
        return f"no space left on device in {directory}"
    errors = [line for line in lines if "error" in line] or lines or ["no output"]
    return errors[0][:200]


def _kill(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold `path`'s lock while building: a second process waits for it, then finds the library
    built. The kernel drops a lock whose holder dies, so a killed build never leaves it held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + BUILD_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Unavailable(f"another process has been building {path.stem}.so for over {BUILD_SECONDS} s") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _sweep(directory: Path, stem: str) -> None:
    """Remove what killed builds left: this library's scratch directories (no other process builds
    it while this one holds its lock) and any other older than a build may take."""
    stale = time.time() - BUILD_SECONDS
    for entry in directory.iterdir():
        if not entry.name.startswith(SCRATCH):
            continue
        with contextlib.suppress(OSError):
            if entry.name.startswith(f".{stem}") or entry.lstat().st_mtime < stale:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


# ---- where, and for what ----------------------------------------------------------------------------


def _compiler() -> list[str]:
    """The compiler's command: $CXX split as a shell splits it ("ccache g++", "g++ -O2"), its
    program found on the PATH; else c++ or g++."""
    value = os.environ.get("CXX", "").strip()
    if not value:
        found = shutil.which("c++") or shutil.which("g++")
        if found is None:
            raise _Unavailable("no C++ compiler found: set CXX or install g++")
        return [found]
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise _Unavailable(f"CXX={value} cannot be split as a shell would: {e}") from None
    program = shutil.which(words[0]) if words else None
    if program is None:
        raise _Unavailable(f"the C++ compiler in CXX ({words[0] if words else value}) was not found")
    return [program, *words[1:]]


def _directory() -> Path:
    return Path(os.environ.get("LSTMLM_NATIVE_DIR") or cache_dir() / "native")


def _paths(directory: Path, compiler: list[str]) -> tuple[Path, Path]:
    """The library and its manifest."""
    stem = f"recurrence-{_key(compiler)}"
    return directory / f"{stem}.so", directory / f"{stem}.json"


def _key(compiler: list[str]) -> str:
    """What the build depends on: the source, torch, Python, the compiler and this CPU."""
    h = hashlib.sha1(source().encode())
    h.update(" ".join((torch.__version__, sys.version, platform.machine(), *compiler, *FLAGS)).encode())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        h.update(subprocess.run([*compiler, "--version"], capture_output=True, timeout=60, check=False).stdout)
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor()
