"""Shared fixtures: the real corpora, an isolated cache, a loopback HTTP server, tiny training runs."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import gzip
import http.server
import json
import os
import resource
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lstmlm import config_file

if TYPE_CHECKING:
    import torch

    from lstmlm.config import Config
    from lstmlm.data.pipeline import Data
    from lstmlm.model import CharLM
    from lstmlm.train import Trainer
    from lstmlm.vocab import Vocab

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

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

SERVE = "serve"  # the file, whole
NOT_FOUND = "404"
SERVER_ERROR = "500"
STALL = "stall"  # accept the request, then say nothing until the test ends
STALL_BODY = "stall-body"  # send the headers and half the body, then say nothing
CUT = "cut"  # promise the whole length, send half the body, close the connection
GZIP = "gzip"  # the file gzipped on the wire (Content-Length: the compressed size), as CDNs do
BAD_GZIP = "bad-gzip"  # "gzip" that is not: a header, then bytes no inflater accepts
GZIP_BOMB = "gzip-bomb"  # a few KiB on the wire that inflate to GZIP_BOMB_BYTES of zeros (made once, when planned)
DRIP = "drip"  # the file with its length, one byte every DRIP_S
ENDLESS = "endless"  # no length; the file over and over, ENDLESS_BYTES in all (past any cap a test sets)
BEHAVIOURS = (SERVE, NOT_FOUND, SERVER_ERROR, STALL, STALL_BODY, CUT, GZIP, BAD_GZIP, GZIP_BOMB, DRIP, ENDLESS)
GZIP_BOMB_BYTES = 16 << 20
DRIP_S = 0.05
ENDLESS_BYTES = 16 << 20


@functools.lru_cache(maxsize=1)
def gzip_bomb() -> bytes:
    return gzip.compress(bytes(GZIP_BOMB_BYTES), compresslevel=9)


class LoopbackServer(http.server.ThreadingHTTPServer):
    """Serves files from `root` on 127.0.0.1; `plan()` queues misbehaviour for the next requests."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.planned: collections.deque[str] = collections.deque()
        self.requests: list[str] = []  # paths asked for, in order
        self.released = threading.Event()  # ends every stall
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def plan(self, *behaviours: str) -> None:
        """The next requests behave so, in order; once they are used up, files are served."""
        unknown = set(behaviours) - set(BEHAVIOURS)
        assert not unknown, f"unknown behaviours {unknown}"
        if GZIP_BOMB in behaviours:
            gzip_bomb()  # now, not while the client waits for the answer
        self.planned.extend(behaviours)

    def next_behaviour(self) -> str:
        return self.planned.popleft() if self.planned else SERVE

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Release stalled handlers and close the socket: later connections are refused."""
        self.released.set()
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: LoopbackServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        behaviour = self.server.next_behaviour()
        if behaviour == STALL:
            self.server.released.wait()
            return
        if behaviour in (NOT_FOUND, SERVER_ERROR):
            self.send_error(int(behaviour))
            return
        body = self._file_body()
        if body is None:
            self.send_error(404)
        elif behaviour == SERVE:
            self._send(body, len(body))
        elif behaviour in (GZIP, BAD_GZIP, GZIP_BOMB):
            wire = {GZIP: lambda: gzip.compress(body), BAD_GZIP: lambda: b"\x1f\x8b\x08\x00" + b"not deflate data" * 64, GZIP_BOMB: gzip_bomb}[behaviour]()
            self._send(wire, len(wire), encoding="gzip")
        elif behaviour == DRIP:
            self._send(b"", len(body))
            for i in range(len(body)):
                if self.server.released.wait(DRIP_S):  # the test is over
                    break
                self._write(body[i : i + 1])
            self.close_connection = True
        elif behaviour == ENDLESS:
            self._send(b"", None)
            for _ in range(ENDLESS_BYTES // len(body)):
                if self.server.released.is_set() or not self._write(body):
                    break
            self.close_connection = True
        else:
            self._send(body[: len(body) // 2], len(body))
            if behaviour == STALL_BODY:
                self.server.released.wait()
            self.close_connection = True

    def _file_body(self) -> bytes | None:
        path = self.server.root / urllib.parse.unquote(self.path.lstrip("/").split("?")[0])
        return path.read_bytes() if path.is_file() else None

    def _send(self, body: bytes, length: int | None, encoding: str | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        if encoding is not None:
            self.send_header("Content-Encoding", encoding)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self._write(body)

    def _write(self, data: bytes) -> bool:
        """Send `data`; False once the client has gone."""
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            return False
        return True

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


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

# A few thousand characters of word salad over d2l-like words: fast to train on, learnable within
# a few epochs, and it holds every character of "time traveller" (so d2l samples work on it).
_WORDS = (
    "the time traveller for so it will be convenient to speak of him was expounding a recondite "
    "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and animated"
).split()


def lively_model(
    vocab: Vocab, core: str = "scratch", layers: int = 1, embedding: int = 0, seed: int = 0, scale: float = 0.8, cell: str = "lstm", path: str = "auto"
) -> CharLM:
    """An untrained model (24 hiddens) with weights N(0, scale²), large enough that its logits, and
    their argmax, move from step to step."""
    import torch

    from lstmlm.model import CharLM

    torch.manual_seed(seed)
    net = CharLM(len(vocab), num_hiddens=24, num_layers=layers, core=core, embedding=embedding, cell=cell, path=path)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
    return net.eval()


def synthetic_text(lines: int = 60, seed: int = 1234) -> str:
    import random

    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 12))) + "\n" for _ in range(lines))


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


def tiny_config(corpus: Path, **overrides: object) -> Config:
    """A config for a tiny model (16 hidden, batches of 8×10) on a local text file, raw mode."""
    from lstmlm.config import Config

    base = {
        "corpus": str(corpus), "normalize": "raw", "hidden": 16, "batch_size": 8, "num_steps": 10,
        "epochs": 3, "device": "cpu", "val_fraction": 0.1,
    }  # fmt: skip
    return Config().with_overrides({**base, **overrides}).resolved()


def d2l_data(corpus: Path, **overrides: object) -> Data:
    """What `lstmlm train --config configs/d2l.toml --corpus CORPUS` trains on: the path training takes."""
    from lstmlm.data.pipeline import prepare_data

    cfg = config_file.load(CONFIGS / "d2l.toml").with_overrides({"corpus": str(corpus), **overrides}).resolved()
    return prepare_data(cfg)


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


# ---- the command line, in-process -----------------------------------------------------------------


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> list[dict[str, Any]]:
        """stdout's JSON lines, strictly: NaN or Infinity (not JSON) fail the test."""
        return [json.loads(line, parse_constant=_not_json) for line in self.stdout.splitlines()]


def _not_json(constant: str) -> Any:
    raise AssertionError(f"{constant} is not JSON")


def strict_json(text: str) -> Any:
    """`text` parsed as JSON, strictly: NaN or Infinity (not JSON) fail the test."""
    return json.loads(text, parse_constant=_not_json)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """A server-sent event stream as (event, data) pairs: each block one `event:` line and one
    `data:` line of strict JSON."""
    parsed = []
    for block in text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            parsed.append((name[7:], strict_json(data[6:])))
    return parsed


def cli(*args: str | Path) -> Result:
    """`lstmlm ARGS...` run in this process: its exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from lstmlm.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return Result(result.exit_code, result.stdout, result.stderr)


def assert_one_error_line(result: Result, *fragments: str, code: int = 1, during_training: bool = False) -> None:
    """One "error: ..." line on stderr; a failure during training may follow the progress bar's
    last frame (Rich prints it when the bar stops), nothing else."""
    assert result.code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    if during_training:
        assert all(line.startswith("epoch ") for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def lstmlm_process(*args: str | Path, timeout: float = 180.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m lstmlm ARGS` as a real process with 4 GiB of address space: a command that reads
    without end fails instead of taking the machine, and one that waits fails the test (timeout)."""

    def bounded() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    environment = {**os.environ, "LSTMLM_DEBUG": "0", **(env or {})}
    command = [sys.executable, "-m", "lstmlm", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout, preexec_fn=bounded)


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


def fill(disk: Path, leave: int) -> Path:
    """Write until the filesystem says it is full, then give back `leave` bytes; the filler file,
    to delete to make room again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        f.truncate(f.tell() - leave)
    return filler


# ---- shared checks and models ----------------------------------------------------------------------


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """|actual - expected| ≤ tol · max(1, max|expected|): absolute for values of order one,
    relative for large gradients."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= tol * scale, f"{what}: max difference {diff:.3g} > {tol:.0e} × {scale:.3g}"


# ---- host synchronisation, counted on a CPU as a GPU would meet it ---------------------------------

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


class Payload:
    """Unpickling this runs `touch(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def predict_ch8(prefix: str, num_preds: int, net: CharLM, vocab: Vocab) -> str:
    """d2l's predict_ch8: warm up on the prefix one character at a time, then feed back the argmax."""
    import torch

    state = net.begin_state(batch_size=1)
    outputs = [vocab.index[prefix[0]]]
    get_input = lambda: torch.tensor([outputs[-1]]).reshape((1, 1))  # noqa: E731
    for y in prefix[1:]:  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(vocab.index[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)  # y: (1, 1, vocab) here; d2l's is (1, vocab)
        outputs.append(int(y.reshape(1, -1).argmax(dim=1).reshape(1)))
    return "".join(vocab.tokens[i] for i in outputs)


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


class ServeProcess:
    """`python -m lstmlm serve ARGS --port 0` (a free loopback port): its URL once it serves,
    and everything it wrote on stderr (drained by a thread, so the pipe never fills).
    `preexec_fn` runs in the child before it starts (to lower its resource limits, say)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lstmlm", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn,
        )  # fmt: skip
        self.lines: list[str] = []
        self._serving = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = ""

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("serving the runs"):
                self.url = line.split(" at ")[1].split(" ")[0].rstrip("/")
                self._serving.set()
        self._serving.set()  # it ended: whoever waits learns it at once

    def wait_serving(self, timeout: float = 90.0) -> ServeProcess:
        self._serving.wait(timeout)
        assert self.url, f"lstmlm serve did not start: {self.lines}"
        return self

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def rss(self) -> int:
        """The server's resident memory in bytes (/proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; its exit code."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """serve_process(*args, wait=True, preexec_fn=None): start `lstmlm serve`; every one is
    stopped at teardown."""
    started: list[ServeProcess] = []

    def start(*args: str | Path, wait: bool = True, preexec_fn: Callable[[], None] | None = None) -> ServeProcess:
        server = ServeProcess([str(a) for a in args], preexec_fn=preexec_fn)
        started.append(server)
        return server.wait_serving() if wait else server

    yield start
    for server in started:
        server.stop()


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, parsed JSON) of a GET, or of a POST of `body` as JSON, with the standard library."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
