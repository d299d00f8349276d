"""Shared fixtures: the compiled recurrence built once, the real corpora, an isolated cache, loopback
HTTP servers, tiny training runs, a real full disk, serve processes. The helpers they and the
tests use live in tests/support/."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from support.cli import cli
from support.loopback import LoopbackServer
from support.serving import ServeProcess
from support.tiny import synthetic_text, tiny_config

if TYPE_CHECKING:
    from lstmlm.train import Trainer

# The compiled recurrence (lstmlm/native.py): built once a machine into a cache of the tests' own
# that outlives the session (native.py names each build by its source, torch, compiler and CPU,
# so an edit of the source builds anew), not into each test's $LSTMLM_HOME, and not for a session
# whose tests never run it. Its processes inherit the directory. A test that trains or generates
# asks for one of NEEDS_THE_BUILD; any other that runs the recurrence builds it there on first use.
os.environ.setdefault("LSTMLM_NATIVE_DIR", str(Path.home() / ".cache" / "lstmlm-test-native"))
NEEDS_THE_BUILD = {"recurrence", "corpus_file", "tiny_train_args", "make_trainer", "tiny_runs", "serve_process", "data_dir"}


@pytest.fixture(scope="session")
def compiled_recurrence() -> None:
    """Built (or found built) before the first test that trains or generates: the tests that run
    lstmlm in a process of their own (under a file-size limit, on a full disk) then find it built
    rather than build it there."""
    from lstmlm import native

    native.recurrence()


@pytest.fixture(autouse=True)
def _built_where_needed(request: pytest.FixtureRequest) -> None:
    if NEEDS_THE_BUILD.intersection(request.fixturenames):
        request.getfixturevalue("compiled_recurrence")


# ---- test data and cache ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real corpora (../shared/data beside the checkout), named by $LSTMLM_TEST_DATA."""
    value = os.environ.get("LSTMLM_TEST_DATA")
    if not value:
        pytest.skip("LSTMLM_TEST_DATA is not set: point it at the directory holding timemachine.txt (.ci/run does)")
    path = Path(value)
    if not (path / "timemachine.txt").is_file():
        pytest.skip(f"LSTMLM_TEST_DATA={value} does not hold timemachine.txt")
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own $LSTMLM_HOME, so none reads or writes the real cache."""
    home = tmp_path_factory.mktemp("lstmlm-home")
    monkeypatch.setenv("LSTMLM_HOME", str(home))
    return home


@pytest.fixture(params=["compiled", "fused"])
def recurrence(request: pytest.FixtureRequest) -> Iterator[str]:
    """The scratch core's path, and generation's step, both ways: compiled (lstmlm/native.py)
    and the Python fast path it replaces where no C++ compiler is. A test builds its model with
    `path=recurrence`."""
    from lstmlm import native

    if request.param == "fused":
        yield "fused"
        return
    if native.recurrence() is None:
        pytest.skip(f"the compiled recurrence is not here: {native.status()}")
    yield "compiled"


# ---- loopback HTTP server -----------------------------------------------------------------------


@pytest.fixture
def serve_dir(tmp_path: Path) -> Path:
    """The directory the loopback server serves; tests put files in it (or override this fixture)."""
    root = tmp_path / "served"
    root.mkdir()
    return root


@pytest.fixture
def start_server() -> Iterator[Callable[[Path], LoopbackServer]]:
    """Start loopback servers on any directory (e.g. the real corpora); all stop at teardown."""
    servers: list[LoopbackServer] = []

    def start(root: Path) -> LoopbackServer:
        server = LoopbackServer(root)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def http_server(serve_dir: Path, start_server: Callable[[Path], LoopbackServer]) -> LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving `serve_dir`."""
    return start_server(serve_dir)


# ---- small training runs ----------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """The suite shares two cores: one torch thread per process avoids oversubscription."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A local synthetic corpus (about 4,000 characters, letters, spaces and newlines)."""
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    return path


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def tiny_train_args(corpus_file: Path, runs_dir: Path) -> list[str]:
    """`lstmlm train` options for a tiny model on `corpus_file` (raw text): a second or so per run."""
    return [
        "train", "--corpus", str(corpus_file), "--normalize", "raw", "--runs-dir", str(runs_dir),
        "--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--epochs", "2", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture
def make_trainer(runs_dir: Path, corpus_file: Path) -> Callable[..., Trainer]:
    """make_trainer(name, corpus=None, **config overrides): a Trainer (CPU, fp32) writing
    runs_dir/name; an existing run is reopened (call .resume() to continue it)."""
    import torch

    from lstmlm.data.pipeline import prepare_data
    from lstmlm.runs import RunStore
    from lstmlm.train import Trainer

    def make(name: str = "run", corpus: Path | None = None, capture: Any = None, clock: Any = None, **overrides: object) -> Trainer:
        """`capture` and `clock` go to the Trainer (a graph recorded on the CPU; a fake clock)."""
        cfg = tiny_config(corpus or corpus_file, **overrides)
        data = prepare_data(cfg)
        root = runs_dir / name
        store = RunStore.open(root) if (root / "config.json").exists() else RunStore.create(root, cfg, data.vocab)
        timing = {"clock": clock} if clock is not None else {}
        return Trainer(store, cfg, data, torch.device("cpu"), "fp32", capture=capture, **timing)

    return make


# ---- a real full disk ----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs) mounted in tmp_path; needs root and mount."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a filesystem here: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a filesystem here (needs root): {done.stderr.decode().strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, timeout=30)


# ---- trained runs shared by the session (generation, serving and export never write to them) --------


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs directory with two tiny trained runs, 3 epochs each, read-only for the tests:
    "raw" (raw text in paragraphs, so it has a prime; scratch, 2 layers) and "d2l" (d2l text, cudnn)."""
    root = tmp_path_factory.mktemp("tiny-runs")
    corpus = root / "corpus.txt"
    lines = synthetic_text(80).splitlines(keepends=True)
    corpus.write_text("".join(line + ("\n" if i % 8 == 7 else "") for i, line in enumerate(lines)), encoding="utf-8")
    tiny = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu", "--epochs", "3", "--optimizer", "adam", "--lr", "0.02"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        common = ["train", "--corpus", corpus, "--runs-dir", root / "runs", *tiny]
        for args in (("--normalize", "raw", "--run", "raw", "--model", "scratch", "--layers", "2"), ("--normalize", "d2l", "--run", "d2l", "--model", "cudnn")):
            result = cli(*common, *args)
            assert result.code == 0, result.stderr
    yield root / "runs"


# ---- a real `lstmlm serve` process ------------------------------------------------------------------


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """serve_process(*args, wait=True, preexec_fn=None, env=None): start `lstmlm serve`; every one
    is stopped at teardown."""
    started: list[ServeProcess] = []

    def start(*args: str | Path, wait: bool = True, preexec_fn: Callable[[], None] | None = None, env: dict[str, str] | None = None) -> ServeProcess:
        server = ServeProcess([str(a) for a in args], env=env, preexec_fn=preexec_fn)
        started.append(server)
        return server.wait_serving() if wait else server

    yield start
    for server in started:
        server.stop()
