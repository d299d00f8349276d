"""A real `lstmlm serve` process on a loopback port: 32 concurrent streaming clients for a
bounded time — every stream completes or is refused cleanly, the server stays up, within its
concurrency limit, its memory bounded; a client killed mid-stream does not leak its
generation; loopback by default (other names refused), a warning on any other address; a
port in use is one line; Ctrl-C stops it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")

from conftest import ServeProcess, assert_one_error_line, cli, http_json, sse_events

CLIENTS = 32
LOAD_SECONDS = 5.0  # how long the clients keep asking
MAX_CONCURRENT = 8
MEMORY_GROWTH = 64 * 2**20  # the most the server may grow under load, after a warm-up


def stream_once(address: tuple[str, int], body: dict[str, Any]) -> str:
    """One streamed generation: "done" (the whole stream, ending in its done event) or
    "refused" (503 and a one-line JSON error, nothing else); anything else fails."""
    conn = http.client.HTTPConnection(*address, timeout=60)
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status == 503:
            error = json.loads(response.read())
            assert list(error) == ["error"] and error["error"].startswith("busy:"), error
            return "refused"
        assert response.status == 200, (response.status, response.read())
        got = sse_events(response.read().decode())
        text = "".join(data["text"] for name, data in got if name == "text")
        assert got[0][0] == "start" and got[-1] == ("done", {"characters": len(text), "finish_reason": "length"}), got[-1]
        return "done"
    finally:
        conn.close()


def wait_idle(url: str, timeout: float = 20.0) -> dict[str, Any]:
    """/api/status once no generation is running (the test fails if that never comes)."""
    deadline = time.monotonic() + timeout
    while True:
        status = http_json(url + "/api/status")[1]
        if status["active"] == 0 or time.monotonic() > deadline:
            return dict(status)
        time.sleep(0.1)


def test_32_streaming_clients_complete_or_are_refused_and_the_server_stays_up(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-concurrent", MAX_CONCURRENT, "--max-length", 2000)
    body = {"run": "raw", "prefix": "the", "length": 1500, "temperature": 1.0}
    for _ in range(3):  # warm up: the model loaded, worker threads started
        stream_once(server.address, body)
    warm = [threading.Thread(target=stream_once, args=(server.address, body)) for _ in range(MAX_CONCURRENT)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    baseline = server.rss()

    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    seen_active: list[int] = []
    end = time.monotonic() + LOAD_SECONDS

    def client() -> None:
        while time.monotonic() < end:
            try:
                outcomes[stream_once(server.address, body)] += 1
            except Exception as e:  # every one is reported below
                failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen_active.append(http_json(server.url + "/api/status")[1]["active"])
        time.sleep(0.2)
    for t in threads:
        t.join()

    assert failures == [], failures[:5]
    assert outcomes["done"] > 0 and outcomes["refused"] > 0, outcomes  # both happened: 32 clients, 8 slots
    assert max(seen_active) <= MAX_CONCURRENT
    assert server.proc.poll() is None  # still up
    assert wait_idle(server.url)["active"] == 0  # and every slot back
    assert stream_once(server.address, body) == "done"
    grown = server.rss() - baseline
    assert grown < MEMORY_GROWTH, f"the server grew by {grown / 2**20:.0f} MiB over {sum(outcomes.values())} requests"


CLIENT = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
conn.request("POST", "/api/generate", json.dumps({"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}),
             {"Content-Type": "application/json"})
response = conn.getresponse()
while b"event: text" not in response.readline():
    pass
print("streaming", flush=True)
while response.read(4096):
    pass
"""


def test_a_client_killed_mid_stream_does_not_leak_its_generation(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-length", 10**8, "--deadline", 3600)
    host, port = server.address
    client = subprocess.Popen([sys.executable, "-c", CLIENT, host, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "streaming\n"
        assert http_json(server.url + "/api/status")[1]["active"] == 1  # 10^8 characters to go, an hour allowed
        os.kill(client.pid, signal.SIGKILL)
        client.wait()
        assert wait_idle(server.url)["active"] == 0  # the generation stopped and gave its slot back
    finally:
        client.kill()
        client.wait()
    assert stream_once(server.address, {"run": "raw", "prefix": "the", "length": 100}) == "done"
    assert not [line for line in server.lines if "Traceback" in line or "ERROR" in line], server.lines


def test_loopback_by_default_answers_only_loopback_names(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs)
    host, port = server.address
    assert host == "127.0.0.1" and not any("warning" in line for line in server.lines)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/api/status", headers={"Host": f"rebound.example:{port}"})
    response = conn.getresponse()
    assert response.status == 400 and json.loads(response.read())["error"].startswith("this server answers requests for")
    conn.close()
    assert http_json(f"http://localhost:{port}/api/status")[0] == 200
    assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines)


def test_any_other_address_is_served_with_a_warning(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--host", "0.0.0.0")
    assert server.lines[0] == "warning: serving on 0.0.0.0: anyone who can reach this machine can use the API (no authentication)"
    port = server.address[1]
    assert http_json(f"http://127.0.0.1:{port}/api/status")[0] == 200
    assert server.stop() == 0


def test_a_port_in_use_is_one_line(tiny_runs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--port", str(port)), f"cannot serve on 127.0.0.1:{port}", "in use")


def test_an_address_that_does_not_resolve_is_one_line(tiny_runs: Path) -> None:
    assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--host", "no-such-host.invalid"), "cannot serve on no-such-host.invalid")
