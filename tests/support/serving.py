"""`lstmlm serve` as the tests meet it: a real process on a free loopback port (`ServeProcess`),
its JSON answers (`http_json`) and its server-sent event streams (`sse_events`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.cli import strict_json


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
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
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
        host, port = self.url.split("://", 1)[1].rsplit(":", 1)
        return host, int(port)

    def rss(self) -> int:
        """The server's resident memory in bytes (/proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; its exit code once it has ended (`finish`)."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.finish()

    def finish(self, timeout: float = 20.0) -> int:
        """Its exit code once it has ended (killed if it takes over `timeout` seconds) and its
        last line is read: the process may end before the thread reading its stderr has read
        all it wrote ("stopped" was missing from `lines`, read at once, under load)."""
        import subprocess

        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drainer.join(timeout=10)  # to the end of its stderr
        return self.proc.returncode


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
