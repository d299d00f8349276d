"""The compiled recurrence (lstmlm/native.py, csrc/recurrence.cpp) builds where a compiler is, and
its absence is never an error. (That each cell's kernel computes what its equations and torch's
module compute is tests/test_cells.py's.)

Where a C++ compiler is present (CI's machine has one) the build must succeed: a failing build
would silently leave every user on the slower loop, so it fails here instead.

Its cache loads only what its build made (size, SHA-256), only from a directory and files no one
else may write to; a library without the ops, a killed build, a full disk, `CXX` with arguments
each end in the compiled recurrence or the Python loop with the reason, never a crash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import cells, native
from lstmlm.cells.cores import ScratchCore, TorchCore
from lstmlm.model import torch_to_scratch

from support.references import assert_close

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


# A process where OpenMP grants fewer threads than torch asks for: the compiled forward of each
# cell, on two threads' parts, against float64. Its worst error is printed.
FEWER_THREADS = """
import torch
from lstmlm import native
from lstmlm.model import CharLM
assert native.recurrence() is not None
torch.set_num_threads(2)
torch.manual_seed(0)
worst = 0.0
for cell in ("lstm", "gru", "rnn"):
    model = CharLM(30, 64, num_layers=2, core="scratch", cell=cell)
    exact = CharLM(30, 64, num_layers=2, core="scratch", cell=cell).double()
    exact.load_state_dict(model.state_dict())
    ids = torch.randint(0, 30, (16, 20))
    start = [torch.randn_like(s) for s in model.begin_state(16)]
    with torch.no_grad():
        y = model(ids, tuple(start))[0].double()
        expected = exact(ids, tuple(s.double() for s in start))[0]
    worst = max(worst, (y - expected).abs().max().item())
print(worst)
"""


@needs_build
def test_a_thread_limit_below_torchs_threads_leaves_no_part_undone() -> None:
    """A step's units are cut into a part per thread asked for; under OMP_THREAD_LIMIT=1 OpenMP
    grants one, and the other part was never computed: outputs off by 0.1, or NaN. Each thread
    now takes every team-th part."""
    result = subprocess.run([sys.executable, "-c", FEWER_THREADS], capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 1e-5


# ---- the cache: what is built, what is trusted, what is left behind -------------------------------
#
# On real files and, where it matters, in real processes. A real build takes 10-60 s, so the
# compiler here is a stand-in (a program native.py runs as it runs any compiler): it says a
# version, notes each build, and "builds" by copying the session's real library, leaving it
# group-writable as a linker does under umask 002.

STAND_IN = """#!/bin/sh
case " $* " in *" --version "*) echo "stand-in c++ 1.0"; echo version >> {versions}; exit 0 ;; esac
echo "$* TMPDIR=$TMPDIR" >> {log}
out=
while [ $# -gt 0 ]; do
    if [ "$1" = -o ]; then out=$2; fi
    shift
done
if [ -e {hang} ]; then
    head -c 4096 {real} > "$out"
    echo partial > "$TMPDIR/cc-stand-in.s"
    echo $$ > {pid}
    exec sleep 600
fi
cp {real} "$out" && chmod 775 "$out"
"""

# Code put in the cache by someone else: it registers no ops, and leaves a mark where the test
# looks if it is ever loaded (a constructor runs as the library loads).
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *mark = getenv("PLANTED_MARK");
  FILE *f = mark ? fopen(mark, "w") : NULL;
  if (f) { fputs("it ran\n", f); fclose(f); }
}
"""

# What train, generate and serve do first: load the recurrence and run it (a truncated library
# crashed every one of them here with SIGBUS).
PROBE = """
import json, torch
from lstmlm import cells, native
from lstmlm.cells.cores import ScratchCore
status = native.status()
if native.recurrence() is not None:
    for cell in cells.every():
        ScratchCore(cell, 5, 8, 1, path="compiled")(torch.randint(0, 5, (4, 3)))
print(json.dumps(status))
"""

TIMEOUT_S = 180.0  # a generous bound for a loaded machine; never an assertion on speed
OTHER_UID = 54321
REFUSED = "refused, since whoever may write there could run code in this process"


@dataclasses.dataclass
class StandIn:
    path: Path
    log: Path  # one line a build: its arguments and $TMPDIR
    versions: Path  # one line a `--version` call (the cache key's)
    hang: Path  # while this exists, a build writes part of its output, then hangs
    pid: Path  # where a hanging build writes its pid

    def builds(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture(scope="session")
def real_library(compiled_recurrence: None) -> bytes:
    """The session's real build (tests/conftest.py), which the stand-in copies."""
    if native.recurrence() is None:
        pytest.skip(f"the compiled recurrence is not here: {native.status()}")
    library, _ = native._paths(native._directory(), native._compiler())
    return library.read_bytes()


@pytest.fixture
def stand_in(tmp_path: Path, real_library: bytes, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    """The stand-in compiler, as $CXX."""
    tools = tmp_path / "tools"
    tools.mkdir()
    real = tools / "real.so"
    real.write_bytes(real_library)
    s = StandIn(tools / "stand-in-c++", tools / "builds.log", tools / "versions.log", tools / "hang", tools / "pid")
    fields = {name: shlex.quote(str(getattr(s, name))) for name in ("log", "versions", "hang", "pid")}
    s.path.write_text(STAND_IN.format(real=shlex.quote(str(real)), **fields))
    s.path.chmod(0o755)
    monkeypatch.setenv("CXX", shlex.quote(str(s.path)))
    return s


@pytest.fixture(scope="session")
def planted_library(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    compiler = shutil.which("cc") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C compiler on this machine to make a library to plant")
    where = tmp_path_factory.mktemp("planted")
    (where / "planted.c").write_text(PLANTED)
    subprocess.run([compiler, "-x", "c", "-shared", "-fPIC", str(where / "planted.c"), "-o", str(where / "planted.so")],
                   check=True, capture_output=True, timeout=TIMEOUT_S)  # fmt: skip
    return (where / "planted.so").read_bytes()


def plant(directory: Path, content: bytes) -> tuple[Path, Path]:
    """`content` in the cache under the name the next build would have, with a manifest that
    matches it: only who owns the files and who may write to them stand between it and the
    loader. The library and its manifest."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    library, manifest = native._paths(directory, native._compiler())
    library.write_bytes(content)
    library.chmod(0o755)
    manifest.write_text(json.dumps({"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}))
    manifest.chmod(0o644)
    return library, manifest


def probe(**env: str) -> str:
    """native.status() in a new process, after running the recurrence; that process must exit 0."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env}, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    return str(json.loads(done.stdout.splitlines()[-1]))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".recurrence-"))


def test_a_build_is_private_and_the_next_process_takes_it_as_it_is(fresh: Path, stand_in: StandIn) -> None:
    """Under umask 002 (Debian's for users with a group of their own) the cache is still private,
    or the next run would refuse it; a later process (the load cache cleared) builds nothing."""
    mask = os.umask(0o002)
    try:
        assert native.needs_build()
        assert native.status() == "compiled (C++)"
    finally:
        os.umask(mask)
    (library,) = fresh.glob("recurrence-*.so")
    manifest = json.loads(library.with_suffix(".json").read_text())
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE(library.stat().st_mode) == 0o755
    assert stat.S_IMODE(library.with_suffix(".json").stat().st_mode) == 0o644
    assert manifest["size"] == library.stat().st_size and manifest["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    (build,) = stand_in.builds()
    assert f"TMPDIR={fresh}/.{library.stem}-" in build, "the compiler's temporary files go into the build's scratch directory"
    assert leftovers(fresh) == []
    native._load.cache_clear()
    assert not native.needs_build()
    assert native.status() == "compiled (C++)"
    assert len(stand_in.builds()) == 1, "built once, not on every run"


def test_cxx_is_split_as_a_shell_splits_it(fresh: Path, stand_in: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`CXX="ccache g++"`, `CXX="g++ -O2"`: a launcher or flags before native.py's own, a quoted
    path with a space; built once, then found (no retry on every run)."""
    spaced = tmp_path / "my tools" / "c++ stand-in"
    spaced.parent.mkdir()
    shutil.copy(stand_in.path, spaced)
    monkeypatch.setenv("CXX", f"'{spaced}' --launcher-word -O2")
    assert native.status() == "compiled (C++)"
    (build,) = stand_in.builds()
    assert build.startswith(f"--launcher-word -O2 {' '.join(native.FLAGS)} ")
    native._load.cache_clear()
    assert native.status() == "compiled (C++)"
    assert len(stand_in.builds()) == 1


@pytest.mark.parametrize(
    ("cxx", "reason"),
    [
        ("{fresh}/no-such-compiler", "the C++ compiler in CXX ({fresh}/no-such-compiler) was not found"),
        ("no-such-launcher g++", "the C++ compiler in CXX (no-such-launcher) was not found"),
        ("'g++ -O2", "CXX='g++ -O2 cannot be split as a shell would: No closing quotation"),
    ],
    ids=["missing", "missing-launcher", "unbalanced-quote"],
)
def test_without_a_compiler_the_python_loop_runs(fresh: Path, monkeypatch: pytest.MonkeyPatch, cxx: str, reason: str) -> None:
    monkeypatch.setenv("CXX", cxx.format(fresh=fresh))
    assert native.recurrence() is None
    assert not native.needs_build()
    assert native.status() == f"python loop ({reason.format(fresh=fresh)})"
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
    assert not list(fresh.glob("*.so")) and leftovers(fresh) == [], "nothing half-built is left"


def test_switched_off_by_the_environment(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTMLM_NATIVE", "0")
    assert native.recurrence() is None
    assert native.status() == "python loop (LSTMLM_NATIVE=0)"
    assert not fresh.exists(), "nothing was built"


def damage(library: Path, manifest: Path, how: str) -> None:
    content = library.read_bytes()
    if how == "truncated":
        os.truncate(library, len(content) // 2)
    elif how == "empty":
        os.truncate(library, 0)
    elif how == "a-byte-changed":
        middle = len(content) // 2
        library.write_bytes(content[:middle] + bytes([content[middle] ^ 1]) + content[middle + 1 :])
    elif how == "no-manifest":
        manifest.unlink()
    elif how == "manifest-not-json":
        manifest.write_text("{")


@pytest.mark.parametrize("how", ["truncated", "empty", "a-byte-changed", "no-manifest", "manifest-not-json"])
def test_a_library_unlike_its_manifest_is_built_again(fresh: Path, stand_in: StandIn, real_library: bytes, how: str) -> None:
    assert native.status() == "compiled (C++)"
    (library,) = fresh.glob("recurrence-*.so")
    damage(library, library.with_suffix(".json"), how)
    native._load.cache_clear()
    assert native.needs_build(), "training says it compiles"
    assert native.status() == "compiled (C++)"
    assert len(stand_in.builds()) == 2
    assert library.read_bytes() == real_library
    assert json.loads(library.with_suffix(".json").read_text())["size"] == len(real_library)


def test_a_truncated_library_is_rebuilt_before_a_process_loads_it(fresh: Path, stand_in: StandIn, real_library: bytes) -> None:
    """Finding 4: a process that met the cut-short library died with SIGBUS, every run after it too."""
    assert native.status() == "compiled (C++)"
    (library,) = fresh.glob("recurrence-*.so")
    os.truncate(library, len(real_library) // 3)
    assert probe() == "compiled (C++)"
    assert library.read_bytes() == real_library
    assert len(stand_in.builds()) == 2


def refuse(directory: Path, how: str) -> str:
    """Make `directory` one that others may write to, or another user's: how native.py says so."""
    if how == "another-user":
        os.chown(directory, OTHER_UID, -1)
        return f"belongs to another user (uid {OTHER_UID})"
    directory.chmod({"group-writable": 0o770, "world-writable": 0o777, "world-writable-sticky": 0o1777}[how])
    return "is group-writable" if how == "group-writable" else "is world-writable"


def needs_root(how: str) -> Any:
    return pytest.param(how, marks=pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root"))


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "world-writable-sticky", needs_root("another-user")])
def test_a_cache_directory_others_may_write_to_is_refused(fresh: Path, stand_in: StandIn, real_library: bytes, how: str) -> None:
    """Whatever it holds, even a library that matches its manifest, nothing is built or loaded there."""
    library, manifest = plant(fresh, real_library)
    why = refuse(fresh, how)
    assert not native.needs_build()
    assert native.recurrence() is None
    status = native.status()
    assert status.startswith(f"python loop (the cache directory {fresh} {why}: {REFUSED}; chmod go-w it, or set LSTMLM_NATIVE_DIR")
    assert stand_in.builds() == [] and sorted(p.name for p in fresh.iterdir()) == sorted([library.name, manifest.name])


@pytest.mark.parametrize("how", [needs_root("another-user"), needs_root("manifest-another-user"), "group-writable", "world-writable", "symlink"])
def test_a_library_others_may_have_written_is_built_again(fresh: Path, stand_in: StandIn, real_library: bytes, tmp_path: Path, how: str) -> None:
    """In a private cache, a library another user owns, or anyone else may write to, is never
    loaded, even where it matches its manifest: it is built again, and then this user's."""
    library, manifest = plant(fresh, real_library)
    if how == "another-user":
        os.chown(library, OTHER_UID, -1)
    elif how == "manifest-another-user":
        os.chown(manifest, OTHER_UID, -1)
    elif how == "symlink":
        elsewhere = tmp_path / "elsewhere.so"
        library.rename(elsewhere)
        library.symlink_to(elsewhere)
    else:
        library.chmod(0o775 if how == "group-writable" else 0o757)
    assert native.needs_build()
    assert native.status() == "compiled (C++)"
    assert len(stand_in.builds()) == 1
    st = library.lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o755
    assert library.read_bytes() == real_library


@pytest.mark.parametrize("where", ["world-writable-directory", needs_root("another-users-library")])
def test_planted_code_never_runs(fresh: Path, stand_in: StandIn, planted_library: bytes, tmp_path: Path, where: str) -> None:
    """A process of its own (this one has loaded the real library already): the planted library's
    constructor would leave its mark the moment it was loaded."""
    library, _ = plant(fresh, planted_library)
    if where == "world-writable-directory":
        refuse(fresh, "world-writable")
    else:
        os.chown(library, OTHER_UID, -1)
    mark = tmp_path / "it-ran"
    status = probe(PLANTED_MARK=str(mark))
    assert not mark.exists(), "the planted library was loaded"
    if where == "world-writable-directory":
        assert status.startswith(f"python loop (the cache directory {fresh} is world-writable: {REFUSED}")
    else:
        assert status == "compiled (C++)" and len(stand_in.builds()) == 1


def test_a_library_without_the_ops_leaves_the_python_loop_with_one_warning(
    fresh: Path, stand_in: StandIn, planted_library: bytes, tmp_path: Path, tiny_train_args: list[str], runs_dir: Path
) -> None:
    """It loads (it is this user's and matches its manifest) but registers no ops: train and
    generate run the Python loop, train says so once; neither fails with an internal error."""
    library, _ = plant(fresh, planted_library)
    mark = tmp_path / "it-ran"
    env = {**os.environ, "PLANTED_MARK": str(mark)}
    train_args = [*tiny_train_args, "--epochs", "1"]  # the Python loop, on a loaded machine: one epoch says it
    train = subprocess.run([sys.executable, "-m", "lstmlm", *train_args], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert train.returncode == 0, train.stderr
    assert mark.exists(), "the library was loaded: what follows is the ops' absence, not a refusal"
    warnings = [line for line in train.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: the scratch core runs its fused path: the compiled recurrence cannot run: {library} loaded but lacks the op "
        f"forward_lstm and {len(native._ops()) - 1} more: remove it to build it again"
    ], train.stderr
    generate = subprocess.run([sys.executable, "-m", "lstmlm", "generate", "--runs-dir", str(runs_dir), "--length", "20"],
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S)  # fmt: skip
    assert generate.returncode == 0 and "error" not in generate.stderr, generate.stderr
    assert generate.stdout.startswith("time traveller") and len(generate.stdout.removesuffix("\n")) == len("time traveller") + 20


def test_a_killed_build_leaves_nothing_that_the_next_build_keeps(fresh: Path, stand_in: StandIn, real_library: bytes) -> None:
    """A build killed mid-way leaves its scratch directory (its partial library, the compiler's
    temporary file); its lock dies with it, so the next build neither waits nor keeps them. An
    older version's temporary, long stale, goes too; another build's fresh scratch stays."""
    stand_in.hang.touch()
    process = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (stand_in.pid.exists() and stand_in.pid.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    compiler = int(stand_in.pid.read_text())
    os.killpg(compiler, signal.SIGKILL)  # native.py started it in a session of its own: it outlives the kill of its parent
    (scratch,) = leftovers(fresh)
    assert {p.name for p in (fresh / scratch).iterdir()} == {"recurrence.cpp", "recurrence.so", "cc-stand-in.s"}
    stand_in.hang.unlink()
    old = fresh / ".recurrence-0a1b2c3d.so"  # the temporary of a build before scratch directories, killed long ago
    old.write_bytes(b"\0" * 100)
    os.utime(old, (time.time() - 2 * native.BUILD_SECONDS,) * 2)
    running = fresh / ".recurrence-0123456789abcdef-x1y2z3"  # another key's build, perhaps still running
    running.mkdir()
    assert native.status() == "compiled (C++)"
    assert leftovers(fresh) == [running.name]
    (library,) = fresh.glob("recurrence-*.so")
    assert library.read_bytes() == real_library


def test_a_process_that_waited_for_the_lock_takes_the_library_built_meanwhile(fresh: Path, stand_in: StandIn, real_library: bytes) -> None:
    """While another holds the build's lock, a process waits; then it finds the library built and
    builds nothing itself."""
    fresh.mkdir(mode=0o700)
    library, _ = native._paths(fresh, native._compiler())
    versions = len(stand_in.versions.read_text().splitlines())  # the key above asked the stand-in once
    with open(library.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT_S
        while len(stand_in.versions.read_text().splitlines()) == versions:  # it has its key: next it takes the lock
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        time.sleep(0.5)
        plant(fresh, real_library)  # as the lock's holder would
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == "compiled (C++)"
    assert stand_in.builds() == []


# ---- a real full disk -------------------------------------------------------------------------------


def test_a_full_disk_is_said_to_be_one(small_disk: Path, stand_in: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's write fails for want of room: the reason says so (not the compiler's last
    words), nothing half-written stays, and with room again the next run builds."""
    directory = small_disk / "native"
    monkeypatch.setenv("LSTMLM_NATIVE_DIR", str(directory))
    native._load.cache_clear()
    directory.mkdir(mode=0o700)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        f.truncate(f.tell() - 16384)  # room for the lock and a scratch directory, not for the library
    try:
        assert native.status() == f"python loop (the C++ build failed: no space left on device in {directory})"
        assert not list(directory.glob("*.so")) and leftovers(directory) == []
        filler.unlink()
        native._load.cache_clear()
        assert native.status() == "compiled (C++)"
    finally:
        native._load.cache_clear()


@needs_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "positions", "vocab"), [(1024, 1120, 28), (37, 300, 5), (5, 33, 300)])
def test_dW_x_for_ids_is_index_adds_sums_to_the_bit(dtype: torch.dtype, rows: int, positions: int, vocab: int) -> None:
    """`sum_by_id` (dW_x of a layer that reads ids) adds each id's columns in their order, as
    torch's index_add does: the same bits, whatever the rows left over from its blocks of 16."""
    ops = native.recurrence()
    assert ops is not None, native.status()
    torch.manual_seed(0)
    dA, ids = torch.randn(rows, positions).to(dtype), torch.randint(0, vocab, (positions,))
    expected = torch.zeros(rows, vocab).index_add_(1, ids, dA.float()).T
    assert torch.equal(ops.sum_by_id(dA, ids, vocab), expected)
    with pytest.raises(RuntimeError, match="ids must lie in"):
        ops.sum_by_id(dA, ids.clone().fill_(vocab), vocab)
