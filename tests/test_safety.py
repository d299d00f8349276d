"""Real processes, real signals: Ctrl-C and SIGTERM stop training with a checkpoint that resumes
bitwise-exactly, a second training into a running one's directory is refused (and disturbs
nothing), and kill -9 at any moment (even mid-write) never leaves a broken checkpoint.

Each test starts `python -m lstmlm train` (one torch thread) and talks to it through its --json
stdout; resuming and the reference runs happen in-process, which is faster.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm.checkpoint import load_checkpoint

from conftest import cli

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TINY = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]
EXACT = [*TINY, "--layers", "2", "--dropout", "0.3"]  # dropout: the torch RNG must be restored too
TIMEOUT_S = 180.0  # a generous bound for a loaded machine; never an assertion on speed


class Training:
    """`python -m lstmlm ARGS` (or a Python driver), its output lines collected as they come."""

    def __init__(self, *args: str | Path, env: dict[str, str], code: str | None = None) -> None:
        head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lstmlm"]
        self.proc = subprocess.Popen(
            [*head, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, "out", self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, "err", self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, name: str, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            self.lines.put((name, line))

    def wait_for(self, stream: str, test: Any) -> str:
        """The first line on `stream` that passes `test`; fails if the process ends first."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                name, line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    time.sleep(0.2)  # let the readers drain
                    if self.lines.empty():
                        pytest.fail(f"exited {self.proc.returncode} first; stderr: {''.join(self.stderr)[-2000:]}")
                continue
            if name == stream and test(line):
                return line
        self.proc.kill()
        pytest.fail(f"timed out; stderr: {''.join(self.stderr)[-2000:]}")

    def wait_for_epoch(self) -> dict[str, Any]:
        line = self.wait_for("out", lambda s: s.startswith("{") and json.loads(s)["event"] == "epoch")
        return json.loads(line)

    def finish(self) -> int:
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(isolated_cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_HOME": str(isolated_cache), "LSTMLM_DEBUG": "0"}


@pytest.fixture
def started() -> Any:
    """Start trainings; whatever a failing test leaves running is killed at teardown."""
    trainings: list[Training] = []

    def start(*args: str | Path, env: dict[str, str], code: str | None = None) -> Training:
        trainings.append(Training(*args, env=env, code=code))
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
            assert path.name in {"config.json", "vocab.json", "metrics.jsonl", ".lock"} or path.name.endswith(".tmp"), path
    json.loads((run / "config.json").read_text())
    json.loads((run / "vocab.json").read_text())


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
    assert second.stderr.splitlines() == [
        f"error: run {runs_dir / 'stopped'} is in use by another training (pid {training.proc.pid})"
    ]
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


# ---- kill -9 -------------------------------------------------------------------------------------------

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
def test_kill_9_in_the_middle_of_a_checkpoint_write(
    started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path
) -> None:
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


# ---- a checkpoint by the clock, mid-epoch, then kill -9 -------------------------------------------

# Runs the CLI on a fake clock that moves 20 s with each training step, and stops still after
# the first checkpoint written inside an epoch, waiting there to be killed.
FAKE_CLOCK_STALL_AFTER_SAVE = r"""
import sys, time
import lstmlm.train as train

now = [0.0]
train.clock = lambda: now[0]
real_step = train.train_step

def step(*args, **kwargs):
    now[0] += 20.0
    return real_step(*args, **kwargs)

train.train_step = step
real_save = train.Trainer.save

def save(self, which="latest"):
    path = real_save(self, which)
    if which == "latest" and self.state.step > 0:
        print(f"SAVED epoch {self.state.epoch} step {self.state.step}", file=sys.stderr, flush=True)
        time.sleep(600)
    return path

train.Trainer.save = save
from lstmlm.cli import app
app(sys.argv[1:], prog_name="lstmlm")
"""


def test_a_checkpoint_by_the_clock_mid_epoch_then_kill_9_resumes_exactly(
    started: Any, env: dict[str, str], corpus_file: Path, runs_dir: Path
) -> None:
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, *EXACT, "--epochs", "2", "--checkpoint-every", "1m"]
    training = started(*args, "--run", "killed", "--json", env=env, code=FAKE_CLOCK_STALL_AFTER_SAVE)
    line = training.wait_for("err", lambda s: s.startswith("SAVED"))
    assert line.strip() == "SAVED epoch 0 step 3"  # 3 steps × 20 s ≥ 1 minute: inside the first epoch
    training.proc.kill()
    assert training.finish() == -signal.SIGKILL

    run = runs_dir / "killed"
    assert_every_checkpoint_loads(run)
    state = load_checkpoint(run / "latest.pt")["trainer"]["state"]
    assert (state["epoch"], state["step"]) == (0, 3)
    resumed = cli("train", "--resume", "--run", "killed", "--runs-dir", runs_dir, "--json")
    assert resumed.code == 0, resumed.stderr
    assert cli(*args, "--run", "straight").code == 0
    assert_same_run(run, runs_dir / "straight")
