"""Real processes, real signals: Ctrl-C and SIGTERM stop training with a checkpoint that resumes
bitwise-exactly, a second training into a running one's directory is refused (and disturbs
nothing), and kill -9 at any moment (even mid-write) never leaves a broken checkpoint.

Each test starts `python -m lstmlm train` (one torch thread) and talks to it through its --json
stdout; resuming and the reference runs happen in-process, which is faster.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import baselines
from lstmlm.checkpoint import load_checkpoint

from support.cli import LiveProcess, Result, assert_one_error_line, cli
from support.faults import HeldEncoding, fill

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TINY = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]
EXACT = [*TINY, "--layers", "2", "--dropout", "0.3"]  # dropout: the torch RNG must be restored too
TIMEOUT_S = 180.0  # a generous bound for a loaded machine; never an assertion on speed
BASELINE_FILES = (baselines.FIGURES, baselines.COUNTS)  # a run's baselines, written at its start (atomically, as the rest)


@pytest.fixture
def env(isolated_cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_HOME": str(isolated_cache), "LSTMLM_DEBUG": "0"}


@pytest.fixture
def started() -> Any:
    """Start trainings; whatever a failing test leaves running is killed at teardown."""
    trainings: list[LiveProcess] = []

    def start(*args: str | Path, env: dict[str, str], code: str | None = None) -> LiveProcess:
        trainings.append(LiveProcess(*args, env=env, code=code))
        return trainings[-1]

    yield start
    for training in trainings:
        training.kill()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "latest.pt")["model"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"
    assert losses(a) == losses(b)


def assert_every_checkpoint_loads(run: Path) -> None:
    """No file with a final name is ever half-written; stray temporaries are all that may be left."""
    for path in run.iterdir():
        if path.suffix == ".pt":
            load_checkpoint(path)
        else:
            assert path.name in {"config.json", "vocab.json", "run.json", "metrics.jsonl", ".lock", *BASELINE_FILES} or path.name.endswith(".tmp"), path
    for name in ("config.json", "vocab.json", "run.json"):
        json.loads((run / name).read_text())
    if (run / baselines.FIGURES).exists():
        assert baselines.read(run) is not None
    if (run / baselines.COUNTS).exists():
        assert baselines.load_counts(run) is not None


# ---- SIGINT, SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code", "iterator"), [(signal.SIGINT, 130, "sequential"), (signal.SIGTERM, 143, "random")])
def test_signal_saves_says_how_to_resume_and_resumes_exactly_and_a_second_training_is_refused(
    started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path, signum: int, code: int, iterator: str
) -> None:
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *EXACT, "--iterator", iterator]
    training = started(*args, "--epochs", "500", "--run", "stopped", "--json", env=env)
    training.wait_for_epoch()

    # meanwhile, a second training into the same run is refused, and disturbs nothing (checked below)
    second = cli("train", "--resume", "--run", "stopped", "--runs-dir", runs_dir, "--epochs", "600")
    assert second.code == 1 and "Traceback" not in second.stderr
    assert second.stderr.splitlines() == [f"error: run {runs_dir / 'stopped'} is in use by another training (pid {training.proc.pid})"]
    fresh = cli(*args, "--epochs", "3", "--run", "stopped")
    assert fresh.code == 1 and "already exists" in fresh.stderr

    training.wait_for_epoch()  # the first goes on
    training.proc.send_signal(signum)
    assert training.finish() == code
    stderr = "".join(training.stderr)
    assert "Traceback" not in stderr
    assert f"continue with: lstmlm train --resume --run stopped --runs-dir {runs_dir}" in stderr
    records = [json.loads(line) for line in training.stdout]  # stdout stays JSON lines only
    assert records[-1]["event"] == "done" and records[-1]["reason"] == "interrupted"

    run = runs_dir / "stopped"
    assert_every_checkpoint_loads(run)
    state = load_checkpoint(run / "latest.pt")["trainer"]["state"]
    epochs = state["epoch"] + 2  # finish one more epoch than was started
    resumed = cli("train", "--resume", "--run", "stopped", "--runs-dir", runs_dir, "--epochs", epochs, "--json")
    assert resumed.code == 0, resumed.stderr
    done = [json.loads(line) for line in resumed.stdout.splitlines()][-1]
    assert done["reason"] == "completed" and done["epochs"] == epochs

    # the interrupted-and-resumed run is the run that was never interrupted, bit for bit
    assert cli(*args, "--epochs", epochs, "--run", "straight").code == 0
    assert_same_run(run, runs_dir / "straight")


def test_sigterm_before_training_unwinds_leaving_no_temporary_and_no_worker(tmp_path: Path, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    """SIGTERM while a new corpus is encoded (before training's own handler is installed) killed
    the command where it stood: the half-written token store stayed in the cache under its
    temporary name, never removed, and the encoding's workers ran on. It now unwinds as Ctrl-C
    does: one line, exit 143, no temporary, no worker."""
    held = HeldEncoding(tmp_path, env)
    training = LiveProcess("train", "--corpus", corpus_file, "--runs-dir", runs_dir, *TINY, env=held.env, code=held.code)
    try:
        training.wait_until(lambda: len(held.workers) == 2, "piece held by each worker")
        assert list((Path(env["LSTMLM_HOME"]) / "encoded").glob(".*.tmp"))  # the store being written
        assert training.stop(signal.SIGTERM) == 143
        assert_one_error_line(Result(143, "".join(training.stdout), "".join(training.stderr)), "terminated", code=143)
        assert not held.running()
        assert not list((Path(env["LSTMLM_HOME"]) / "encoded").glob(".*.tmp"))
        assert not runs_dir.exists()  # no run was made
    finally:
        training.kill()
        held.kill()


def _interrupt(*args: Any, **kwargs: Any) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["lstmlm.training.Trainer", "lstmlm.train.Trainer.run"])
def test_a_new_run_stopped_before_its_first_checkpoint_is_removed(monkeypatch: pytest.MonkeyPatch, corpus_file: Path, runs_dir: Path, where: str) -> None:
    """Ctrl-C while the model or its compiled step was built left the run made with no
    checkpoint: holding the name, listed as stopped, refused by --resume. It goes now, and the
    same command trains."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--run", "r", "--epochs", "1"]
    with monkeypatch.context() as patched:
        patched.setattr(where, _interrupt)
        assert_one_error_line(cli(*args), "interrupted", code=130)
    assert not (runs_dir / "r").exists()
    assert cli(*args).code == 0 and (runs_dir / "r" / "latest.pt").is_file()


def test_an_error_after_a_checkpoint_keeps_the_run(monkeypatch: pytest.MonkeyPatch, corpus_file: Path, runs_dir: Path) -> None:
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--run", "r"]
    assert cli(*args, "--epochs", "1").code == 0
    monkeypatch.setattr("lstmlm.train.Trainer.run", _interrupt)
    assert_one_error_line(cli(*args, "--epochs", "2", "--resume"), "interrupted", code=130)
    assert (runs_dir / "r" / "latest.pt").is_file()


LOADING = {
    # the application's modules: a finder makes their import raise it
    "import": """
import importlib.abc, sys

class Interrupted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lstmlm.cli.app":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupted())
""",
    # Typer building the command line from the commands' signatures, before click's own handling
    "build": """
import typer.main

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

typer.main.get_command = interrupted
""",
    # Typer parsing the arguments, which it ends by exit 130 without a word
    "parse": """
import typer.core

def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

typer.core.TyperGroup.parse_args = interrupted
""",
}


RUN_VERSION = """
import sys
sys.argv = ["lstmlm", "--version"]
from lstmlm.cli import main
main()
"""


def test_sigterm_while_the_command_line_loads_is_one_line_and_143(env: dict[str, str]) -> None:
    """SIGTERM before any command's handler killed the process in silence (-15)."""
    terminated = """
import importlib.abc, os, signal, sys, time

class Terminated(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "lstmlm.cli.app":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        return None

sys.meta_path.insert(0, Terminated())
"""
    result = subprocess.run([sys.executable, "-c", terminated + RUN_VERSION], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert (result.returncode, result.stdout, result.stderr) == (143, "", "error: terminated\n")


@pytest.mark.parametrize("stage", list(LOADING))
def test_ctrl_c_while_the_command_line_loads_is_one_line_and_130(env: dict[str, str], stage: str) -> None:
    """The application takes a third of a second to load and build, before any command's handler
    runs: a Ctrl-C then printed Python's traceback."""
    result = subprocess.run([sys.executable, "-c", LOADING[stage] + RUN_VERSION], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "error: interrupted\n")


# Runs the CLI with torch's load held where torch's extension imports numpy (it clears any
# error that import raises and loads on without it): a marker line, then a wait for a file.
HOLD_TORCH_LOAD = """
import importlib.abc, os, sys, time
from pathlib import Path

class Held(importlib.abc.MetaPathFinder):
    held = False

    def find_spec(self, name, path, target=None):
        if name == "numpy" and "torch" in sys.modules and not Held.held:
            Held.held = True
            print("LOADING TORCH", file=sys.stderr, flush=True)
            while not Path(os.environ["RELEASE"]).exists():
                time.sleep(0.02)
        return None

sys.meta_path.insert(0, Held())
sys.argv = ["lstmlm", *sys.argv[1:]]
from lstmlm.cli import main
main()
"""


@pytest.mark.parametrize(("signum", "code", "line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_while_torch_loads_stops_the_command(tiny_runs: Path, tmp_path: Path, env: dict[str, str], signum: int, code: int, line: str) -> None:
    """Ctrl-C or SIGTERM while torch loaded was raised inside torch's extension, which took it for
    numpy failing to load, cleared it and loaded on: the command ran to its end as if never
    stopped (and SIGTERM, ignored from then on while the command unwound, was lost for good), or
    torch aborted the process (exit 134). Held until torch is loaded, it stops the command."""
    release, output = tmp_path / "release", tmp_path / "model.pt"
    export = LiveProcess("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", output, env={**env, "RELEASE": str(release)}, code=HOLD_TORCH_LOAD)
    try:
        export.wait_for("err", lambda s: s.startswith("LOADING TORCH"))
        export.proc.send_signal(signum)
        release.touch()
        assert export.finish() == code
        assert "".join(export.stderr).splitlines()[1:] == [f"error: {line}"]
        assert not output.exists() and list(tmp_path.iterdir()) == [release]
    finally:
        export.kill()


# Runs the CLI with an exit handler that holds the interpreter's teardown (with torch loaded it
# takes a second or more, in torch's own exit handlers): a marker line, then a wait for a file.
HOLD_TEARDOWN = """
import atexit, os, sys, time
from pathlib import Path

def held():
    print("TEARING DOWN", file=sys.stderr, flush=True)
    while not Path(os.environ["RELEASE"]).exists():
        time.sleep(0.02)

atexit.register(held)
sys.argv = ["lstmlm", *sys.argv[1:]]
from lstmlm.cli import main
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_has_ended_ends_the_process_with_its_code(tiny_runs: Path, tmp_path: Path, env: dict[str, str], signum: int) -> None:
    """Ctrl-C while the interpreter tore down after a command had done its work (its output
    written and said) printed a traceback from an exit handler ("Exception ignored in atexit
    callback"), or killed the process by the signal, without a line; SIGTERM killed it. The
    process now ends at once, with the command's exit code."""
    release, output = tmp_path / "release", tmp_path / "model.pt"
    export = LiveProcess("export", "--run", "raw", "--runs-dir", tiny_runs, "-o", output, env={**env, "RELEASE": str(release)}, code=HOLD_TEARDOWN)
    try:
        export.wait_for("err", lambda s: s.startswith("TEARING DOWN"))
        export.proc.send_signal(signum)
        assert export.finish() == 0
        assert "".join(export.stderr).splitlines() == ["TEARING DOWN"]
        assert "".join(export.stdout).startswith(f"wrote {output} (torchscript") and output.is_file()
    finally:
        release.touch()
        export.kill()


def test_the_printed_resume_command_continues_as_the_interrupted_resume_would(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    """A resume's --epochs is saved in the run and repeated in the command printed at Ctrl-C:
    that command trains on towards it (before, it ran the stored 2 epochs: done at once, NaN)."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--run", "r"]
    assert cli(*args, "--epochs", "2").code == 0
    training = started("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "500", "--json", env=env)
    training.wait_for_epoch()
    training.proc.send_signal(signal.SIGINT)
    assert training.finish() == 130
    printed = "".join(training.stderr).strip().splitlines()[-1]
    assert printed == f"stopped: checkpoint saved; continue with: lstmlm train --resume --run r --runs-dir {runs_dir} --epochs 500"
    done = json.loads(training.stdout[-1], parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert done["reason"] == "interrupted" and math.isfinite(done["perplexity"])
    assert json.loads((runs_dir / "r" / "config.json").read_text())["train"]["epochs"] == 500

    bare = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--max-minutes", "0.01", "--json")
    done = bare.json()[-1]
    assert done["reason"] == "time_limit" and done["epochs"] >= 3 and math.isfinite(done["perplexity"])


# ---- kill -9 -------------------------------------------------------------------------------------------


def test_kill_9_before_the_first_checkpoint_then_resume_is_refused(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    """Killed before its first checkpoint, a run has a best.pt and metrics but no latest.pt: a
    resume would start over, overwrite best.pt with a worse model and log epochs twice."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY]
    training = started(*args, "--run", "early", "--epochs", "500", "--checkpoint-every", "1000", "--json", env=env)
    training.wait_for_epoch()
    training.wait_for_epoch()
    training.proc.kill()
    assert training.finish() == -signal.SIGKILL
    run = runs_dir / "early"
    assert (run / "best.pt").is_file() and not (run / "latest.pt").exists()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"}  # the lock still names the dead pid
    result = cli("train", "--resume", "--run", "early", "--runs-dir", runs_dir)
    assert_one_error_line(result, f"run {run} has no checkpoint to resume from: it stopped before writing its first (delete {run} and train it again)")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".lock"} == before


# Runs the CLI with torch.save slowed down: the second write of latest.pt stops half-way
# (flushed to disk) and waits there to be killed.
STALL_MID_WRITE = r"""
import io, os, sys, time
import torch
real_save = torch.save
latest_writes = 0

def save(obj, f, *args, **kwargs):
    global latest_writes
    name = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}")) if hasattr(f, "fileno") else ""
    if name.startswith(".latest.pt."):
        latest_writes += 1
        if latest_writes == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            print("MID-WRITE", file=sys.stderr, flush=True)
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
from lstmlm.cli import app
app(sys.argv[1:], prog_name="lstmlm")
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_kill_9_in_the_middle_of_a_checkpoint_write(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *EXACT, "--val-fraction", "0"]
    training = started(*args, "--epochs", "4", "--checkpoint-every", "1e", "--run", "killed", "--json", env=env, code=STALL_MID_WRITE)
    training.wait_for("err", lambda line: line.strip() == "MID-WRITE")
    run = runs_dir / "killed"
    half = [p for p in run.iterdir() if p.name.startswith(".latest.pt.") and p.name.endswith(".tmp")]
    assert len(half) == 1 and half[0].stat().st_size > 0  # the write really was under way
    training.proc.kill()
    assert training.finish() == -signal.SIGKILL

    assert_every_checkpoint_loads(run)
    assert load_checkpoint(run / "latest.pt")["trainer"]["state"]["epoch"] == 1  # the previous one, whole
    resumed = cli("train", "--resume", "--run", "killed", "--runs-dir", runs_dir, "--json")
    assert resumed.code == 0, resumed.stderr
    records = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [2, 3, 4]
    assert not half[0].exists()  # the next training cleared the dead one's temporary file
    assert cli(*args, "--epochs", "4", "--checkpoint-every", "1e", "--run", "straight").code == 0
    assert_same_run(run, runs_dir / "straight")


def test_kill_9_at_random_moments(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    """Checkpoints every epoch, killed at random times: each time every checkpoint loads, and
    the run, resumed after the last kill, is the run that was never killed."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *EXACT]
    rng = random.Random(2024)
    run = runs_dir / "killed"
    first = [*args, "--run", "killed", "--epochs", "500", "--checkpoint-every", "1", "--json"]
    again = ["train", "--resume", "--run", "killed", "--runs-dir", runs_dir, "--json"]  # the stored config
    for attempt in range(2):
        training = started(*(again if attempt else first), env=env)
        training.wait_for_epoch()
        time.sleep(rng.uniform(0.0, 1.0))
        training.proc.kill()
        assert training.finish() == -signal.SIGKILL
        assert_every_checkpoint_loads(run)
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)

    reached = load_checkpoint(run / "latest.pt")["trainer"]["state"]["epoch"]
    assert cli("train", "--resume", "--run", "killed", "--runs-dir", runs_dir, "--epochs", reached + 1).code == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, reached + 2))
    assert cli(*args, "--epochs", reached + 1, "--checkpoint-every", "1", "--run", "straight").code == 0
    assert_same_run(run, runs_dir / "straight")


# ---- a real full disk ------------------------------------------------------------------------------


def assert_full_disk_kept_the_run(result: Any, run: Path, before: dict[str, bytes], reason: str) -> None:
    """One line naming the checkpoint write and the OS's reason; the checkpoints as they were, no temporaries."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write the checkpoint {run}/") and last.endswith(f".pt: {reason}"), result.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    assert_every_checkpoint_loads(run)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_full_filesystem_during_training_is_one_line_and_the_checkpoints_survive(small_disk: Path, env: dict[str, str], corpus_file: Path) -> None:
    runs = small_disk / "runs"
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs, *TINY, "--run", "r"]
    assert cli(*args, "--epochs", "1").code == 0
    run = runs / "r"
    before = {name: (run / name).read_bytes() for name in ("latest.pt", "best.pt")}
    filler = fill(small_disk, leave=8192)  # room for the config and a metrics line, not for a checkpoint
    resume = [sys.executable, "-m", "lstmlm", "train", "--resume", "--run", "r", "--runs-dir", str(runs), "--epochs", "3"]
    result = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert_full_disk_kept_the_run(result, run, before, "No space left on device")
    filler.unlink()  # room again: the run resumes from the checkpoint that survived
    again = cli("train", "--resume", "--run", "r", "--runs-dir", runs, "--epochs", "3", "--json")
    assert [r["epoch"] for r in again.json() if r["event"] == "epoch"] == [2, 3]


def test_a_file_size_limit_during_training_is_one_line_and_the_checkpoints_survive(env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    """RLIMIT_FSIZE (Python ignores SIGXFSZ): every write past 8 KiB fails with EFBIG, as a
    full disk fails with ENOSPC, inside torch's zip writer; the metrics line still fits."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--run", "r"]
    assert cli(*args, "--epochs", "1").code == 0
    run = runs_dir / "r"
    before = {name: (run / name).read_bytes() for name in ("latest.pt", "best.pt")}
    assert min(len(b) for b in before.values()) > 8192

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    resume = [sys.executable, "-m", "lstmlm", "train", "--resume", "--run", "r", "--runs-dir", str(runs_dir), "--epochs", "3"]
    result = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, preexec_fn=limit)
    assert_full_disk_kept_the_run(result, run, before, "File too large")


# ---- two trainings started at the same instant ----------------------------------------------------

# Runs the CLI, held at a gate (a shared flock the test holds exclusively) just before the run is
# named and created, with its first fsyncs (the run's files) slowed down as on a slow disk: the
# two processes the test releases together then name and create their runs at the same instant.
AT_THE_GATE = r"""
import fcntl, os, sys, time
from lstmlm import training as trainings
real_training, real_fsync = trainings.start, os.fsync
slow = [3]

def slow_fsync(fd):
    if slow[0] > 0:
        slow[0] -= 1
        time.sleep(0.2)
    real_fsync(fd)

def training(plan):
    print("AT THE GATE", file=sys.stderr, flush=True)
    with open(os.environ["GATE"]) as gate:
        fcntl.flock(gate, fcntl.LOCK_SH)
    os.fsync = slow_fsync
    return real_training(plan)

trainings.start = training
from lstmlm.cli import app
app(sys.argv[1:], prog_name="lstmlm")
"""


def test_two_trainings_started_at_the_same_instant_get_a_run_each(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--epochs", "1", "--json"]
    with open(gate) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        trainings = {seed: started(*args, "--seed", seed, env={**env, "GATE": str(gate)}, code=AT_THE_GATE) for seed in ("1", "2")}
        for training in trainings.values():
            training.wait_for("err", lambda line: line.strip() == "AT THE GATE")
    # released: both name and create their runs now
    for training in trainings.values():
        assert training.finish() == 0, "".join(training.stderr)
    names = {seed: json.loads(t.stdout[-1])["run"] for seed, t in trainings.items()}
    assert sorted(names.values()) == ["corpus-scratch", "corpus-scratch-2"]
    for seed, name in names.items():  # each run's files describe the training that wrote it
        assert json.loads((runs_dir / name / "config.json").read_text())["train"]["seed"] == int(seed)
        assert json.loads(load_checkpoint(runs_dir / name / "latest.pt")["config"])["train"]["seed"] == int(seed)


def test_two_trainings_into_one_named_run_at_the_same_instant_one_is_refused(
    started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path, tmp_path: Path
) -> None:
    """The name is claimed before anything is written: the loser writes nothing, so the run's
    config is the winner's (before, both wrote theirs and the lock came too late)."""
    gate = tmp_path / "gate"
    gate.touch()
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *TINY, "--epochs", "1", "--json", "--run", "same"]
    with open(gate) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        trainings = {seed: started(*args, "--seed", seed, env={**env, "GATE": str(gate)}, code=AT_THE_GATE) for seed in ("1", "2")}
        for training in trainings.values():
            training.wait_for("err", lambda line: line.strip() == "AT THE GATE")
    codes = {seed: training.finish() for seed, training in trainings.items()}
    assert sorted(codes.values()) == [0, 1]
    winner, loser = sorted(codes, key=codes.__getitem__)
    assert "".join(trainings[loser].stderr).strip().splitlines()[-1] == (
        f"error: run {runs_dir / 'same'} already exists: continue it with --resume or choose another --run"
    )
    assert json.loads(trainings[winner].stdout[-1])["run"] == "same"
    assert json.loads((runs_dir / "same" / "config.json").read_text())["train"]["seed"] == int(winner)
    assert json.loads(load_checkpoint(runs_dir / "same" / "latest.pt")["config"])["train"]["seed"] == int(winner)


# ---- a checkpoint by the clock, mid-epoch, then kill -9 -------------------------------------------

# Runs the CLI on a fake clock that moves 20 s with each training step, and stops still after
# the first checkpoint written inside an epoch, waiting there to be killed.
FAKE_CLOCK_STALL_AFTER_SAVE = r"""
import functools, sys, time
import lstmlm.training as trainings
import lstmlm.step as step_mod
import lstmlm.train as train

now = [0.0]
trainings.Trainer = functools.partial(train.Trainer, clock=lambda: now[0])  # every trainer the command builds, on this clock
real_step = step_mod.train_step

def step(*args, **kwargs):
    now[0] += 20.0
    return real_step(*args, **kwargs)

step_mod.train_step = step
real_save = train.Trainer.save

def save(self, which="latest"):
    path = real_save(self, which)
    if which == "latest" and self.progress.batch > 0:
        print(f"SAVED epoch {self.progress.epoch} step {self.progress.batch}", file=sys.stderr, flush=True)
        time.sleep(600)
    return path

train.Trainer.save = save
from lstmlm.cli import app
app(sys.argv[1:], prog_name="lstmlm")
"""


def test_a_checkpoint_by_the_clock_mid_epoch_then_kill_9_resumes_exactly(started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path) -> None:
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *EXACT, "--epochs", "2", "--checkpoint-every", "1m"]
    training = started(*args, "--run", "killed", "--json", env=env, code=FAKE_CLOCK_STALL_AFTER_SAVE)
    line = training.wait_for("err", lambda s: s.startswith("SAVED"))
    assert line.strip() == "SAVED epoch 0 step 3"  # 3 steps × 20 s ≥ 1 minute: inside the first epoch
    training.proc.kill()
    assert training.finish() == -signal.SIGKILL

    run = runs_dir / "killed"
    assert_every_checkpoint_loads(run)
    state = load_checkpoint(run / "latest.pt")["trainer"]["state"]
    assert (state["epoch"], state["batch"]) == (0, 3)
    resumed = cli("train", "--resume", "--run", "killed", "--runs-dir", runs_dir, "--json")
    assert resumed.code == 0, resumed.stderr
    assert cli(*args, "--run", "straight").code == 0
    assert_same_run(run, runs_dir / "straight")
