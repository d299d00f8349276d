"""A real `lstmlm serve` process on a loopback port: 32 concurrent streaming clients for a
bounded time — every stream completes or is refused cleanly, the server stays up, within its
concurrency limit, its memory bounded; a client killed mid-stream does not leak its
generation; hundreds of slow clients cut off (connection cap, header and body deadlines) while
the server answers, its log quiet, its descriptor limit raised; a body too large refused
before it is read; the model cache bounded; bad files and names answered in JSON; loopback
by default, its own URL answered on any loopback address, only its own names (and IP
addresses) answered on every address, with a warning; a port in use is one line; Ctrl-C
stops it; a closed connection freed at once, not left to the cyclic collector."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")

import uvicorn

from lstmlm.serve import Limits
from lstmlm.serve.app import create_app
from lstmlm.serve.connections import ACCEPT_BATCH, Guarded, OncePerKind, guarded
from lstmlm.serve.server import bind

from support.cli import assert_one_error_line, cli
from support.serving import ServeProcess, http_json, sse_events

CLIENTS = 32
LOAD_SECONDS = 5.0  # how long the clients keep asking
MAX_BATCH = 8  # rows stepping together, and as many waiting
# A generation's characters: enough that the clients wait for the batch, not the batch for them,
# so that 8 requests wait past its places (only then is one refused); at 1,500 they often never did.
LENGTH = 20_000
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
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-batch", MAX_BATCH, "--queue", MAX_BATCH, "--max-length", LENGTH)
    body = {"run": "raw", "prefix": "the", "length": LENGTH, "temperature": 1.0}
    for _ in range(3):  # warm up: the model loaded, worker threads started
        stream_once(server.address, body)
    warm = [threading.Thread(target=stream_once, args=(server.address, body)) for _ in range(MAX_BATCH)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()
    baseline = server.rss()

    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    seen_running: list[int] = []
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
        seen_running.append(http_json(server.url + "/api/status")[1]["running"])
        time.sleep(0.2)
    for t in threads:
        t.join()

    assert failures == [], failures[:5]
    assert outcomes["done"] > 0 and outcomes["refused"] > 0, outcomes  # both happened: 32 clients, 8 places and 8 waiting
    assert max(seen_running) <= MAX_BATCH
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


def test_a_client_that_hangs_up_on_a_generation_asked_for_as_json_ends_it(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-length", 10**8, "--deadline", 3600)
    body = json.dumps({"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0, "stream": False}).encode()
    with socket.create_connection(server.address) as sock:
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 20
        while http_json(server.url + "/api/status")[1]["running"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_json(server.url + "/api/status")[1]["running"] == 1  # 10^8 characters to go, an hour allowed
    assert wait_idle(server.url)["active"] == 0  # the client is gone: the generation stopped and gave its row back
    assert not [line for line in server.lines if "Traceback" in line or "ERROR" in line], server.lines


def reset_after_answer(address: tuple[str, int]) -> None:
    """A status asked for and read whole on a kept-alive connection, which the client then
    resets (RST): the server loses it with an error, its keep-alive timer set."""
    conn = http.client.HTTPConnection(*address, timeout=30)  # HTTP/1.1: the connection stays open after the answer
    conn.request("GET", "/api/status")
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # on, 0 s: close sends RST
    conn.close()


def connections_held() -> list[str]:
    """The connections' protocols and transports still in memory."""
    return [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), (Guarded, asyncio.Transport))]


def test_a_closed_connection_is_freed_at_once_not_left_to_the_cyclic_collector(tiny_runs: Path) -> None:
    """A stream read to its end, a status, a client that resets its kept-alive connection: once
    each is closed its protocol and transport are gone, by reference counting alone. In cycles
    (Python 3.11's transport holding a bound method of itself, uvicorn's keep-alive timer left
    set on a connection lost with an error) each waited for the cyclic collector, which the
    server runs seldom, and its memory grew under a steady load."""
    limits = Limits()
    sock = bind("127.0.0.1", 0)
    address = sock.getsockname()[:2]
    app = create_app(tiny_runs, limits, "cpu", "fp32", allowed_hosts=["127.0.0.1"])
    server = uvicorn.Server(uvicorn.Config(app, http=guarded(limits), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    gc.collect()
    gc.disable()  # what a cycle holds stays held
    try:
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        for _ in range(3):
            assert stream_once(address, {"run": "raw", "prefix": "the", "length": 50}) == "done"
            assert http_json(f"http://{address[0]}:{address[1]}/api/status")[0] == 200
            reset_after_answer(address)
        until = time.monotonic() + 10  # the server closes its side a moment after the client
        while (held := connections_held()) and time.monotonic() < until:
            time.sleep(0.05)
        assert held == []
    finally:
        gc.enable()
        server.should_exit = True
        thread.join(10)
        sock.close()


def status_with_host(address: tuple[str, int], host: str) -> tuple[int, dict[str, Any]]:
    """GET /api/status with this Host header: (status, JSON body)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", "/api/status", headers={"Host": host})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_loopback_by_default_answers_only_loopback_names_and_head_as_get(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs)
    host, port = server.address
    assert host == "127.0.0.1" and not any("warning" in line for line in server.lines)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/api/status", headers={"Host": f"rebound.example:{port}"})
    response = conn.getresponse()
    assert response.status == 400 and json.loads(response.read())["error"].startswith("this server answers requests for")
    conn.close()
    assert http_json(f"http://localhost:{port}/api/status")[0] == 200
    # HEAD (`curl -I`, a monitor's check) as GET without the body: it was 405; on one
    # connection, so a body sent after a HEAD's headers would be read as the next answer
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for path, kind in [("/", "text/html"), ("/api/status", "application/json"), ("/api/runs", "application/json")]:
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"") and kind in response.headers["content-type"]
    conn.request("GET", "/api/status")
    assert json.loads(conn.getresponse().read())["version"]
    conn.close()
    assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines)


def test_a_server_on_another_loopback_address_answers_its_own_url(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--host", "127.0.0.2")
    assert server.url.startswith("http://127.0.0.2:") and not any("warning" in line for line in server.lines)
    assert http_json(server.url + "/api/status")[0] == 200


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_any_other_address_is_served_with_a_warning_and_answers_only_its_own_names(tiny_runs: Path, serve_process: Any, address: str) -> None:
    if address == "::":
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError:
            pytest.skip("no IPv6 here")
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--host", address, "--allowed-host", "lab.example", "--allowed-host", "Models.Lab.Example")
    assert server.lines[0] == f"warning: serving on {address}: anyone who can reach this machine can use the API (no authentication: see --token)"
    port = server.address[1]
    loopback = ("127.0.0.1" if address == "0.0.0.0" else "::1", port)
    for host in (f"localhost:{port}", socket.gethostname(), "lab.example", "models.lab.example:80", "192.0.2.7", f"[::1]:{port}"):
        assert status_with_host(loopback, host)[0] == 200, host
    for host in ("rebound.example", f"rebound.example:{port}", "lab.example.rebound.example"):
        status, body = status_with_host(loopback, host)
        assert status == 400 and body["error"].startswith("this server answers requests for "), body
        assert all(name in body["error"] for name in ("lab.example", "localhost", "models.lab.example", socket.gethostname(), "or an IP address")), body
    assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines)


def test_a_port_in_use_is_one_line(tiny_runs: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--port", str(port)), f"cannot serve on 127.0.0.1:{port}", "in use")


def test_an_address_that_does_not_resolve_is_one_line(tiny_runs: Path) -> None:
    assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--host", "no-such-host.invalid"), "cannot serve on no-such-host.invalid")


# ---- what a request and a connection may hold --------------------------------------------------------


def raw_request(address: tuple[str, int], head: bytes, body: Iterator[bytes] = iter(()), timeout: float = 30.0) -> tuple[bytes, int]:
    """Send `head`, then `body` a piece at a time until the server answers or closes: (what it
    answered, how many body bytes were sent)."""
    sent = 0
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(head)
        for piece in body:
            if select.select([sock], [], [], 0)[0]:  # answered already
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):  # closed on us: its answer is in the buffer
                break
            sent += len(piece)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:  # a server that closes with a body unread resets the connection after its answer
            pass
    return answer, sent


def answer_json(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_over_the_limit_is_refused_before_it_is_read(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-text", 1000)
    most = http_json(server.url + "/api/status")[1]["max_body"]
    assert most == 12 * (1000 + 1600) + 16 * 1024
    post = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"

    answer, _ = raw_request(server.address, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"x" * 20000)  # 20 KB of headers, unfinished
    assert answer_json(answer) == (400, {"error": "not an HTTP request this server can read: malformed, or its headers over 16 KiB"})

    answer, _ = raw_request(server.address, post + b"Content-Length: 1000000000\r\n\r\n")  # a gigabyte announced, none sent
    refusal = f"the request body (1,000,000,000 bytes) is over this server's limit of {most:,} bytes (what a text of 1,000 characters may take as JSON)"
    assert answer_json(answer) == (413, {"error": refusal})

    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    answer, sent = raw_request(server.address, post + b"Transfer-Encoding: chunked\r\n\r\n", iter([chunk] * 16384))  # a gigabyte, chunked
    assert answer_json(answer)[0] == 413
    assert sent < 64 * 2**20, f"{sent:,} bytes were taken before the refusal"  # of 1 GiB: refused once it was over, not read whole

    # chunked with a small Content-Length beside it: the server reads it chunked (RFC 9112 6.3), so the limit counts the chunks
    whole = iter([chunk] * 256 + [b"0\r\n\r\n"])  # 16 MiB, and the chunk that ends it
    answer, _ = raw_request(server.address, post + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", whole)
    assert answer_json(answer)[0] == 413, answer  # it was read whole, then judged: 400, not JSON

    assert stream_once(server.address, {"run": "raw", "prefix": "the", "length": 50}) == "done"
    assert not [line for line in server.lines if "Traceback" in line], server.lines


def test_the_model_cache_stays_within_max_models_and_forgets_deleted_runs(tiny_runs: Path, tmp_path: Path, serve_process: Any) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    names = [f"raw{i}" for i in range(6)]
    for name in names:
        shutil.copytree(runs / "raw", runs / name)
    server: ServeProcess = serve_process("--runs-dir", runs, "--max-models", 2)
    for _ in range(2):
        for name in names:
            assert stream_once(server.address, {"run": name, "prefix": "the", "length": 20}) == "done"
            assert http_json(server.url + "/api/status")[1]["models"] <= 2
    assert http_json(server.url + "/api/status")[1]["models"] == 2
    for name in names[-2:]:  # the two held
        shutil.rmtree(runs / name)
    assert http_json(server.url + "/api/status")[1]["models"] == 0
    assert http_json(server.url + "/api/generate", {"run": names[-1], "prefix": "the"})[0] == 404


def trickle(sockets: list[socket.socket], stop: threading.Event, pid: int, held: list[int]) -> None:
    """One header line on each socket every 0.3 s, never the blank line that ends the headers;
    and each time, how many sockets the server `pid` holds."""
    while not stop.wait(0.3):
        for sock in sockets:
            try:
                sock.send(b"X-Slow: yes\r\n")
            except OSError:  # the server has closed it
                pass
        held.append(sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd")))


def slow_answer(sock: socket.socket) -> int:
    """The status the server answered a slow socket with before closing it (0: closed without one)."""
    sock.settimeout(30)
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except ConnectionResetError:
        pass
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else 0


SLOW_CLIENTS = 300
NOFILE = 256  # the server's descriptor limit: soft and hard, so it cannot raise it; 32 connections fit


def test_slow_clients_are_cut_off_and_the_server_answers_the_others(tiny_runs: Path, serve_process: Any) -> None:
    limits = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))  # noqa: E731
    server: ServeProcess = serve_process(
        "--runs-dir", tiny_runs, "--max-connections", 32, "--header-timeout", 1, "--body-timeout", 1, "--deadline", 3, "--max-length", 10**8,
        preexec_fn=limits,
    )  # fmt: skip
    sockets = []
    for _ in range(SLOW_CLIENTS):  # ~400 slowloris connections took a server with 1024 descriptors down
        sock = socket.create_connection(server.address, timeout=30)
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: localhost\r\n")
        sockets.append(sock)
    stop, held = threading.Event(), [0]
    dripping = threading.Thread(target=trickle, args=(sockets, stop, server.proc.pid, held))
    dripping.start()
    try:
        answer, _ = raw_request(server.address, b"GET /api/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert answer_json(answer)[0] in (200, 503)  # meanwhile a request is answered, if only with "busy", not left to time out
        answers = Counter(slow_answer(sock) for sock in sockets)
    finally:
        stop.set()
        dripping.join()
        for sock in sockets:
            sock.close()
    # each cut off by the server: past the headers' deadline (408), or over the cap at once (503;
    # a client whose request the server never read may hear a reset in place of the answer: 0)
    assert {408, 503} <= set(answers) <= {408, 503, 0}, answers
    assert max(held) <= 1 + 32 + ACCEPT_BATCH  # the listening socket, the connections kept, those just accepted to be refused

    body = {"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}
    conn = http.client.HTTPConnection(*server.address, timeout=60)
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    got = sse_events(conn.getresponse().read().decode())  # a stream runs past the deadlines for requests: they are for requests only
    assert got[-1][0] == "done" and got[-1][1]["finish_reason"] == "deadline"
    conn.close()

    post = b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    assert answer_json(raw_request(server.address, post + b'{"run"')[0]) == (408, {"error": "the request's body did not arrive within 1 seconds"})

    assert server.proc.poll() is None and stream_once(server.address, {"run": "raw", "prefix": "the", "length": 100}) == "done"
    assert server.stop() == 0 and server.lines[-1] == "stopped", server.lines
    log = server.lines[1:-1]  # between "serving ..." and "stopped": one line for each kind of failure, in whatever order they came
    assert sorted(log) == [
        "WARNING:  closed connections whose request body did not arrive within 1 s of its headers (--body-timeout)",
        "WARNING:  closed connections whose request headers did not arrive within 1 s (--header-timeout)",
        "WARNING:  refused connections: 32 were open, as many as this server keeps (--max-connections)",
    ], server.lines


def test_the_log_says_each_kind_of_failure_in_one_line_at_most_once_a_minute() -> None:
    now = [0.0]
    once = OncePerKind(clock=lambda: now[0])
    lines: list[str] = []
    logger = logging.getLogger("lstmlm-test-once-per-kind")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.addFilter(once)
    logger.propagate = False
    try:
        for second in range(0, 130, 2):  # a failure of each kind every 2 s for over two minutes
            now[0] = float(second)
            try:
                raise OSError(24, "Too many open files")
            except OSError as e:
                logger.error("socket.accept() out of system resource\nsocket: <fd=3>", exc_info=e)
            logger.warning("closed connections whose request headers did not arrive within %g s", 1.0)
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(once)
    accept = "socket.accept() out of system resource socket: <fd=3>: OSError: [Errno 24] Too many open files"
    headers = "closed connections whose request headers did not arrive within 1 s"
    assert lines == [
        accept, headers,
        f"{accept} (and 29 more like it in the 60 s before)", f"{headers} (and 29 more like it in the 60 s before)",
        f"{accept} (and 29 more like it in the 60 s before)", f"{headers} (and 29 more like it in the 60 s before)",
    ]  # fmt: skip


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 1024)))
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [["1024", "1024"]]


def test_too_few_descriptors_for_the_connections_is_one_line(tiny_runs: Path, serve_process: Any) -> None:
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, wait=False, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200)))
    with pytest.raises(AssertionError, match="did not start"):
        server.wait_serving()  # it ends, and everything it wrote is read
    assert server.proc.wait(timeout=10) == 1
    assert server.lines == ["error: --max-connections 256 needs about 448 open files, and this process may open 200 (ulimit -n): lower --max-connections"]


def test_bad_files_and_names_are_answered_in_json_and_the_log_stays_quiet(tiny_runs: Path, tmp_path: Path, serve_process: Any) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    shutil.copytree(runs / "raw", runs / "bad")
    with (runs / "bad" / "metrics.jsonl").open("a") as f:
        f.write("42\n")
    shutil.copytree(runs / "raw", tmp_path / "elsewhere")
    (runs / "out").symlink_to(tmp_path / "elsewhere")
    server: ServeProcess = serve_process("--runs-dir", runs)
    for _ in range(3):
        status, listing = http_json(server.url + "/api/runs")
        assert status == 200 and {r["name"]: "error" in r for r in listing["runs"]} == {"raw": False, "d2l": False, "bad": True}
        assert str(tmp_path) not in json.dumps(listing)
        status, error = http_json(server.url + "/api/generate", {"run": "a" * 300, "prefix": "the"})
        assert status == 400 and error["error"].startswith("a run's name has at most 255 bytes")
        assert http_json(server.url + "/api/runs/" + "a" * 300 + "/metrics")[0] == 400
        assert http_json(server.url + "/api/runs/out/metrics")[0] == 404
        status, error = http_json(server.url + "/api/runs/bad/metrics")
        assert status == 500 and error == {"error": "run bad's metrics.jsonl has a line that is not a JSON object"}
    assert server.stop() == 0
    assert server.lines[1:] == ["stopped"]  # nothing logged: not a traceback, not a line


def test_a_server_stops_on_ctrl_c_with_0_and_on_sigterm_with_143_saying_stopped(tmp_path: Path, serve_process: Any) -> None:
    """Ctrl-C is the way a server is stopped, not an interruption: "stopped" and 0; SIGTERM, a
    service manager's way, "stopped" and 143 (docs/guarantees.md)."""
    (tmp_path / "runs").mkdir()
    for signum, code in ((signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM)):
        server: ServeProcess = serve_process("--runs-dir", tmp_path / "runs")
        assert http_json(server.url + "/api/status")[0] == 200  # serving, uvicorn's handlers in place
        server.proc.send_signal(signum)
        assert server.finish() == code
        assert server.lines[1:] == ["stopped"], server.lines


def test_a_server_that_inherited_ctrl_c_ignored_still_says_stopped(tmp_path: Path, serve_process: Any) -> None:
    """A process started in the background by a script (a shell without job control) inherits
    Ctrl-C ignored. uvicorn took it over all the same and stopped on it, then raised it again on
    its way out, ignored: the server ended without `stopped` (exit 0). So did every server a test
    suite run that way stopped."""
    (tmp_path / "runs").mkdir()
    server: ServeProcess = serve_process("--runs-dir", tmp_path / "runs", preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert http_json(server.url + "/api/status")[0] == 200
    assert server.stop() == 0
    assert server.lines[1:] == ["stopped"], server.lines


# Loaded by the server's Python (PYTHONPATH): asyncio's runner, its loop made and the server's
# coroutine not yet a task, says so in a file, then waits for another: a signal lands after
# "serving ..." is printed and before uvicorn has taken the signals over.
HOLD_BEFORE_UVICORN = """
import asyncio, os, time
from pathlib import Path

run = asyncio.Runner.run

def held(self, coro, **kwargs):
    Path(os.environ["LSTMLM_TEST_HELD"]).touch()
    while not Path(os.environ["LSTMLM_TEST_RELEASE"]).exists():
        time.sleep(0.02)
    return run(self, coro, **kwargs)

asyncio.Runner.run = held
"""


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_a_signal_before_uvicorn_takes_the_signals_over_stops_the_server_saying_stopped(tmp_path: Path, serve_process: Any, signum: int, code: int) -> None:
    """Ctrl-C right after "serving ..." was raised where the process stood: in asyncio's runner,
    the server's coroutine made and never run, and `stopped` was followed by a RuntimeWarning of
    three lines. From the line on, a signal is recorded and stops the server as it serves."""
    hook, held, release = tmp_path / "hook", tmp_path / "held", tmp_path / "release"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_BEFORE_UVICORN)
    (tmp_path / "runs").mkdir()
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "LSTMLM_TEST_HELD": str(held), "LSTMLM_TEST_RELEASE": str(release)}
    server: ServeProcess = serve_process("--runs-dir", tmp_path / "runs", env=env)
    deadline = time.monotonic() + 60
    while not held.exists():
        assert server.proc.poll() is None and time.monotonic() < deadline, server.lines
        time.sleep(0.02)
    server.proc.send_signal(signum)
    release.touch()
    assert server.finish() == code
    assert server.lines[1:] == ["stopped"], server.lines
