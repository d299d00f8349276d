"""The command line as the tests run it: in this process (`cli`, its exit code, stdout and
stderr), or as a real process (`lstmlm_process`, `assert_no_torch`); and what a failure must look
like (`assert_one_error_line`)."""

from __future__ import annotations

import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TIMEOUT_S = 180  # a live process that takes longer to say what a test waits for fails it


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


# The CLI in a fresh process that says last, on stderr, whether it imported torch and how it exited.
_NO_TORCH = """
import sys
from lstmlm.cli import app
try:
    app(sys.argv[1:], prog_name="lstmlm")
except SystemExit as e:
    code = e.code
print("torch imported" if "torch" in sys.modules else "no torch", code, file=sys.stderr)
"""


def assert_no_torch(*args: str | Path, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`lstmlm ARGS` in a fresh process exits 0 without importing torch; the process, to read its output."""
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.stderr.strip().splitlines()[-1] == "no torch 0", done.stderr
    return done


class LiveProcess:
    """`python -m lstmlm ARGS` (or a Python driver) running while the test acts: its output lines
    collected as they come (each stream whole, and in order on `lines`); JSON lines on stdout are `events`."""

    def __init__(self, *args: str | Path, env: dict[str, str] | None = None, code: str | None = None) -> None:
        head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "lstmlm"]
        self.proc = subprocess.Popen([*head, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
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

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.stdout) if line.startswith("{")]

    def wait_until(self, test: Callable[[], Any], what: str) -> None:
        """Poll `test()` until it holds; fail if the process ends first or TIMEOUT_S passes."""
        deadline = time.monotonic() + TIMEOUT_S
        while not test():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {what}: exit {self.proc.returncode}; stderr: {''.join(self.stderr)[-2000:]}")
            time.sleep(0.1)

    def stop(self, signum: int) -> int:
        """Send `signum`; the exit code once it has ended and its output is read."""
        self.proc.send_signal(signum)
        return self.finish()

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
