"""Continuous batching in `lstmlm serve`: concurrent real HTTP clients, joining and leaving a
batch mid-stream, each stream exactly what `lstmlm generate` prints for the same options; a
checkpoint replaced while a batch runs (the batch finishes on the old one, new requests get the
new one); a place freed in one lane taken by a request waiting for another; the queue holding
only the requests past their model's places; a bytes model's deadline. More of the queue's 503,
the deadline and a client gone are in test_serve.py and test_serve_process.py."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")

from fastapi.testclient import TestClient

from lstmlm.choosing import BLOCK
from lstmlm.generate import Sampling
from lstmlm.serve import Limits
from lstmlm.serve.app import create_app
from lstmlm.serve.batching import CALL_S, STEPS, Batches, QueueFull, steps_per_call
from lstmlm.serve.catalog import Models

from support.cli import cli
from support.serving import ServeProcess, http_json, sse_events
from support.tiny import synthetic_text

# Each client's options (besides run and prefix), for every sampling setting; the lengths differ
# so that rows leave while others go on, and the clients start apart so that rows join mid-stream.
SETTINGS: list[dict[str, Any]] = [
    {"length": 150},
    {"length": 90, "temperature": 1.0, "seed": 1},
    {"length": 200, "temperature": 0.8, "top_k": 5, "seed": 2},
    {"length": 60, "temperature": 1.2, "top_p": 0.9, "seed": 3},
    {"length": 170, "temperature": 1.0, "min_p": 0.1, "seed": 4},
    {"length": 120, "temperature": 1.0, "top_p": 0.0, "seed": 5},
    {"length": 140, "temperature": 1.5, "top_k": 8, "top_p": 0.95, "min_p": 0.02, "seed": 6},
    {"length": 200, "temperature": 1.0, "seed": 7, "stop": ["e t"]},
]
PREFIXES = ["the", "and the", "it was", "t"]


def printed(runs: Path, run: str, prefix: str, options: dict[str, Any]) -> str:
    """The continuation `lstmlm generate` prints (without the prefix) for these options."""
    args = ["generate", "--runs-dir", runs, "--run", run, "--prefix", prefix]
    for name, value in options.items():
        for one in value if isinstance(value, list) else [value]:
            args += [f"--{name.replace('_', '-')}", str(one)]
    result = cli(*args)
    assert result.code == 0, result.stderr
    return result.stdout.removesuffix("\n")


def stream(address: tuple[str, int], body: dict[str, Any]) -> tuple[str, str]:
    """A streamed generation over a real connection: (prefix as read, continuation)."""
    conn = http.client.HTTPConnection(*address, timeout=120)
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        got = sse_events(response.read().decode())
    finally:
        conn.close()
    assert got[0][0] == "start" and got[-1][0] == "done", got[-1]
    return got[0][1]["prefix"], "".join(data["text"] for name, data in got if name == "text")


@pytest.mark.parametrize("run", ["raw", "d2l"])
def test_concurrent_clients_stream_what_lstmlm_generate_prints(tiny_runs: Path, serve_process: Any, run: str) -> None:
    """Eight clients, at most three rows a batch: rows join as others leave, and every stream is,
    character for character, what `lstmlm generate` prints for its prefix and options."""
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-batch", 3, "--queue", 16)
    bodies = [{"run": run, "prefix": PREFIXES[i % len(PREFIXES)], **options} for i, options in enumerate(SETTINGS)]
    got: dict[int, tuple[str, str]] = {}

    def client(i: int) -> None:
        time.sleep(0.02 * i)
        got[i] = stream(server.address, bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(len(bodies)))
    for i, body in enumerate(bodies):
        prefix, text = got[i]
        options = {k: v for k, v in body.items() if k not in ("run", "prefix")}
        assert prefix + text == printed(tiny_runs, run, body["prefix"], options), body


def test_a_checkpoint_replaced_while_a_batch_runs(tiny_runs: Path, tmp_path: Path) -> None:
    """The batch on the old checkpoint finishes on it; a request after the replacement gets the new one."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_runs, runs)
    long = {"run": "raw", "prefix": "the", "length": 3000, "temperature": 1.0, "seed": 9}
    before = printed(runs, "raw", "the", {k: v for k, v in long.items() if k not in ("run", "prefix")})
    app = create_app(runs, Limits())
    with TestClient(app) as api, api.stream("POST", "/api/generate", json=long) as old:
        lines = old.iter_lines()
        assert next(lines) == "event: start" and next(lines).startswith("data: ") and next(lines) == ""
        path = runs / "raw" / "latest.pt"
        payload = torch.load(path, weights_only=True)
        payload["model"] = {k: -v for k, v in payload["model"].items()}  # a training step of sorts
        torch.save(payload, path)
        short = {"run": "raw", "prefix": "the", "length": 80, "temperature": 1.0, "seed": 9, "stream": False}
        new = api.post("/api/generate", json=short).json()["text"]
        assert "the" + new == printed(runs, "raw", "the", {"length": 80, "temperature": 1.0, "seed": 9})  # the new checkpoint's
        assert new != before[3:83]
        rest = sse_events("\n".join(lines) + "\n")
        text = "".join(data["text"] for name, data in rest if name == "text")
        assert "the" + text == before  # the old one's, to the end


def test_the_deadline_holds_for_each_row_of_a_batch(tiny_runs: Path) -> None:
    """Two long generations in one batch, both past the deadline: each ends there with what it
    made, streamed or not, and its row is let go."""
    with TestClient(create_app(tiny_runs, Limits(max_length=10**9, deadline_s=0.5))) as api:
        long = {"run": "raw", "prefix": "the", "length": 10**9, "temperature": 1.0}
        done: dict[str, Any] = {}

        def whole() -> None:
            done["whole"] = api.post("/api/generate", json={**long, "stream": False}).json()

        other = threading.Thread(target=whole)
        other.start()
        got = sse_events(api.post("/api/generate", json=long).text)
        other.join()
        text = "".join(data["text"] for name, data in got if name == "text")
        assert got[-1] == ("done", {"characters": len(text), "finish_reason": "deadline"}) and 0 < len(text) < 10**9
        assert done["whole"]["finish_reason"] == "deadline" and 0 < done["whole"]["characters"] < 10**9
        for _ in range(100):
            if api.get("/api/status").json()["running"] == 0:
                break
            time.sleep(0.05)
        assert api.get("/api/status").json()["running"] == 0


def status_of(address: tuple[str, int]) -> dict[str, Any]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("GET", "/api/status")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def until(check: Any, timeout: float = 30.0) -> Any:
    """`check()` once it is true (looked at every few milliseconds), or its last value after `timeout`."""
    end = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < end:
        time.sleep(0.01)
    return value


def test_a_request_waiting_takes_the_place_another_lane_frees(tiny_runs: Path, serve_process: Any) -> None:
    """Two lanes of a place each, both taken by long streams; a third request waits. When the
    second lane's client hangs up, the waiting request takes its place and ends while the first
    lane's stream still runs (it waited for the lane it came to, the first, until that one's
    row ended: its length, or the deadline, with nothing made)."""
    server: ServeProcess = serve_process("--runs-dir", tiny_runs, "--max-batch", 2, "--lanes", 2, "--max-length", 10**9)
    long = json.dumps({"run": "raw", "prefix": "the", "length": 10**9, "temperature": 1.0})
    streams = []
    for running in (1, 2):  # the first to lane 0, the second to lane 1 (the fewest rows)
        conn = http.client.HTTPConnection(*server.address, timeout=60)
        conn.request("POST", "/api/generate", long, {"Content-Type": "application/json"})
        assert conn.getresponse().status == 200
        streams.append(conn)
        assert until(lambda n=running: status_of(server.address)["running"] == n)
    got: dict[str, Any] = {}
    short = {"run": "raw", "prefix": "the", "length": 20, "stream": False}
    waiting = threading.Thread(target=lambda: got.update(http_json(f"{server.url}/api/generate", short, timeout=60)[1]))
    waiting.start()
    try:
        assert until(lambda: status_of(server.address)["queued"] == 1)
        streams[1].close()  # lane 1's place is free
        waiting.join(20)
        assert got.get("finish_reason") == "length" and status_of(server.address)["running"] == 1  # lane 0's stream goes on
        assert "the" + got["text"] == printed(tiny_runs, "raw", "the", {"length": 20})
    finally:
        streams[0].close()
        waiting.join()
    assert until(lambda: (s := status_of(server.address))["running"] == s["queued"] == s["batches"] == 0)


def test_the_queue_holds_the_requests_that_wait_for_a_place_not_those_that_have_one(tiny_runs: Path) -> None:
    """`queue` bounds the requests past their model's `max_batch` places. It counted every
    request not stepping yet, a request priming with places free among them: with 64 places and
    a queue of 1, 7 of 16 requests sent together to an idle server were refused."""
    batches = Batches(max_batch=2, queue=1)
    models = Models(tiny_runs)
    raw, d2l = models.get("raw"), models.get("d2l")
    for _ in range(3):  # priming together: two have a place, the third waits
        batches.admit(raw)
    with pytest.raises(QueueFull, match="1 requests wait"):
        batches.admit(raw)
    batches.admit(d2l)  # another model's places are free: it waits for none
    long = Sampling(length=10**6, temperature=1.0)
    rows = [batches.submit(raw, "the", long, "")[1] for _ in range(3)] + [batches.submit(d2l, "the", long, "")[1]]
    assert until(lambda: batches.status() == {"running": 3, "queued": 1, "batches": 2})  # raw's 2, d2l's 1
    with pytest.raises(QueueFull):
        batches.admit(raw)
    batches.let_go(rows[2])  # the request waiting goes: its place in the queue is free
    batches.admit(raw)
    batches.submit(raw, "the", Sampling(length=0), "")  # nothing to make: it takes no place
    for row in rows:
        batches.let_go(row)
    assert until(lambda: batches.status() == {"running": 0, "queued": 0, "batches": 0}) and batches.priming == {}


@pytest.fixture(scope="module")
def bytes_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory with a tiny bytes model ("bytes"), trained on text with characters of several bytes."""
    root = tmp_path_factory.mktemp("bytes-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_text(20).replace("e", "é"), encoding="utf-8")
    tiny = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu", "--epochs", "1"]
    result = cli("train", "--corpus", corpus, "--runs-dir", root / "runs", "--run", "bytes", "--normalize", "bytes", *tiny)
    assert result.code == 0, result.stderr
    return root / "runs"


def test_a_bytes_models_generation_ends_at_the_deadline_with_what_it_made(bytes_runs: Path) -> None:
    """A bytes model's generation past the deadline ends there, streamed or not, as a character
    model's does: its text so far, decoded, and `done` (it was a 500, and a stream cut without
    an end: the deadline's last step was not decoded)."""
    with TestClient(create_app(bytes_runs, Limits(max_length=10**9, deadline_s=0.3))) as api:
        long = {"run": "bytes", "prefix": "thé", "length": 10**9, "temperature": 1.0, "seed": 1}
        got = sse_events(api.post("/api/generate", json=long).text)
        text = "".join(data["text"] for name, data in got if name == "text")
        assert got[0][0] == "start" and got[-1] == ("done", {"characters": len(text), "finish_reason": "deadline"}) and text
        whole = api.post("/api/generate", json={**long, "stream": False})
        assert whole.status_code == 200 and whole.json()["finish_reason"] == "deadline" and whole.json()["characters"] > 0


def test_a_batch_makes_about_a_calls_worth_of_steps_a_call() -> None:
    """A call makes the steps that take about CALL_S at the last call's pace: many for a row or
    two (a call's own cost then weighs less), few for a full batch, never fewer than STEPS or
    more than a block of draws."""
    assert steps_per_call(CALL_S / 8, 16) == 128  # 16 steps in an eighth of CALL_S: eight times as many
    assert steps_per_call(CALL_S / 64, 16) == BLOCK  # 1,024 steps' worth: a block at most
    assert steps_per_call(CALL_S * 2, 16) == STEPS  # slower than CALL_S: the fewest
    assert steps_per_call(0.0, 16) == BLOCK  # no time measured: the most
