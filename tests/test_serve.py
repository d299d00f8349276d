"""`lstmlm serve`'s API with FastAPI's test client: every endpoint; generation equal to `lstmlm
generate` (streamed and as JSON); inspection equal to the `inspect` analysis; metrics that
follow a training; one loaded model per run, in a bounded cache that forgets deleted runs; the
bounds (length, text, body size, concurrency, deadline); the Host check; every bad request a
4xx with a one-line JSON error; a run whose files are bad listed as unreadable, a symbolic
link in the runs directory no run, no server path in any answer. The real server process,
under load, against slow clients and in a browser, is tested in test_serve_process.py and
test_page.py."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import sys
import weakref
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")

from fastapi.testclient import TestClient

from lstmlm.errors import ServeError
from lstmlm.generate import Continuation
from lstmlm.inference import load as load_trained
from lstmlm.runs import RunStore
from lstmlm.serve import Limits
from lstmlm.serve.app import create_app, take
from lstmlm.units import activations, colour, gate_of, level
from lstmlm.units_page import hex_colour

from support.cli import assert_one_error_line, cli, strict_json
from support.serving import sse_events


def client(runs: Path, **limits: Any) -> TestClient:
    return TestClient(create_app(runs, Limits(**limits)))


def copies(runs: Path, n: int) -> list[str]:
    """`n` more runs in `runs`, each a copy of "raw" (its own checkpoint file)."""
    names = [f"raw{i}" for i in range(n)]
    for name in names:
        shutil.copytree(runs / "raw", runs / name)
    return names


@pytest.fixture(scope="module")
def api(tiny_runs: Path) -> Iterator[TestClient]:
    with client(tiny_runs) as c:
        yield c


@pytest.fixture
def runs_copy(tiny_runs: Path, tmp_path: Path) -> Path:
    """A private copy of the trained runs, for tests that write to them."""
    shutil.copytree(tiny_runs, tmp_path / "runs")
    return tmp_path / "runs"


def streamed(api: TestClient, **body: Any) -> tuple[str, dict[str, Any], str]:
    """(prefix, done event, continuation) of a streamed generation."""
    response = api.post("/api/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    got = sse_events(response.text)
    assert got[0][0] == "start" and got[-1][0] == "done" and all(name == "text" for name, _ in got[1:-1])
    return got[0][1]["prefix"], got[-1][1], "".join(data["text"] for _, data in got[1:-1])


def assert_error(response: Any, status: int, *fragments: str) -> None:
    """A 4xx (or 5xx) whose body is exactly {"error": one line}."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert "\n" not in body["error"] and body["error"] and "Traceback" not in body["error"]
    for fragment in fragments:
        assert fragment in body["error"], body["error"]


# ---- generation: the text of `lstmlm generate` ------------------------------------------------------

CASES = [
    ("raw", "the", {}),  # greedy, the run's prime read first
    ("raw", "the", {"temperature": 0.9, "seed": 3}),
    ("raw", "was", {"temperature": 1.2, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "seed": 11}),
    ("raw", "the", {"temperature": 1.0, "seed": 4, "prime": False}),
    ("d2l", "Time Traveller!", {"temperature": 0.8, "seed": 2}),  # normalized as d2l
    ("raw", "was", {"best": True}),  # the best-validation checkpoint
]


@pytest.mark.parametrize(("run", "prefix", "options"), CASES)
def test_generate_streams_the_text_lstmlm_generate_prints(api: TestClient, tiny_runs: Path, run: str, prefix: str, options: dict[str, Any]) -> None:
    args = ["generate", "--run", run, "--runs-dir", tiny_runs, "--prefix", prefix, "--length", "150"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else ["--no-prime"] if key == "prime" else [flag, str(value)]
    expected = cli(*args).stdout
    read, done, text = streamed(api, run=run, prefix=prefix, length=150, **options)
    assert read + text + "\n" == expected
    assert done == {"characters": len(text), "finish_reason": "length"}  # 150 tokens; "<unk>" is one of 5 characters
    whole = api.post("/api/generate", json={"run": run, "prefix": prefix, "length": 150, "stream": False, **options}).json()
    assert whole == {"run": run, "prefix": read, "normalized": read != prefix, "text": text, "characters": len(text), "finish_reason": "length"}


def test_a_long_generation_streams_in_several_events(api: TestClient) -> None:
    response = api.post("/api/generate", json={"run": "raw", "prefix": "the", "length": 3000, "temperature": 1.0, "seed": 1})
    texts = [data["text"] for name, data in sse_events(response.text) if name == "text"]
    assert len(texts) >= 3000 // 512 and len("".join(texts)) >= 3000  # at most 512 steps an event


def test_generate_ends_at_a_stop_string(api: TestClient, tiny_runs: Path) -> None:
    body = {"run": "raw", "prefix": "the", "length": 300, "temperature": 1.0, "seed": 5}
    full = api.post("/api/generate", json={**body, "stream": False}).json()["text"]
    stop = full[50:53]
    _, done, text = streamed(api, **body, stop=[stop, "never written"])
    assert text == full[: full.index(stop)] and done["finish_reason"] == "stop"
    args = ["generate", "--run", "raw", "--runs-dir", tiny_runs, "--prefix", "the", "--length", "300", "--temperature", "1", "--seed", "5"]
    assert "the" + text + "\n" == cli(*args, "--stop", stop).stdout


# ---- inspection: the `inspect` analysis ---------------------------------------------------------------


@pytest.mark.parametrize(("gate", "layer", "prime"), [("cell", None, True), ("forget", 0, True), ("hidden", 1, False), ("candidate", 0, True)])
def test_inspect_gives_the_inspect_analysis_per_character(api: TestClient, tiny_runs: Path, gate: str, layer: int | None, prime: bool) -> None:
    text = "the time traveller was"
    answer = api.post("/api/inspect", json={"run": "raw", "text": text, "gate": gate, "layer": layer, "units": [3, 7], "top": 4, "prime": prime}).json()
    trained = load_trained(tiny_runs, "raw")
    acts = activations(trained.model, trained.vocab, text, trained.prime if prime else "")
    shown = layer if layer is not None else 1
    values = acts[shown].gate(gate)  # (steps, hiddens)
    assert (answer["text"], answer["layer"], answer["layers"], answer["hiddens"], answer["gate"]) == (text, shown, 2, 16, gate)
    assert [u["unit"] for u in answer["units"]] == [3, 7]
    for u in answer["units"]:
        column = values[:, u["unit"]]
        assert u["values"] == pytest.approx(column.tolist(), abs=1e-4)
        assert u["colours"] == [hex_colour(colour(v)) for v in level(gate_of(trained.model.cell, gate), column).tolist()]
    strength = level(gate_of(trained.model.cell, gate), values).abs()
    for t, top in enumerate(answer["top"]):
        assert len(top) == 4
        assert [strength[t, u] for u, _ in top] == sorted((strength[t, u] for u, _ in top), reverse=True)
        assert min(strength[t, u] for u, _ in top) >= strength[t].topk(4).values[-1] - 1e-6
        assert all(v == pytest.approx(float(values[t, u]), abs=1e-4) for u, v in top)


def test_inspect_after_the_prime_differs_from_a_zero_state(api: TestClient) -> None:
    body = {"run": "raw", "text": "the time", "units": [0]}
    primed, cold = (api.post("/api/inspect", json={**body, "prime": p}).json()["units"][0]["values"] for p in (True, False))
    assert primed != cold


def test_inspect_without_units_shows_the_most_variable(api: TestClient, tiny_runs: Path) -> None:
    answer = api.post("/api/inspect", json={"run": "d2l", "text": "the time traveller"}).json()
    trained = load_trained(tiny_runs, "d2l")
    spread = activations(trained.model, trained.vocab, "the time traveller")[0].gate("cell").std(dim=0)
    assert [u["unit"] for u in answer["units"]] == spread.topk(3).indices.tolist()


# ---- runs and metrics -----------------------------------------------------------------------------------


def test_runs_lists_each_run_with_its_figures(api: TestClient, tiny_runs: Path) -> None:
    response = api.get("/api/runs")
    assert str(tiny_runs.parent) not in response.text  # the corpus by its name, not the server's path to it
    runs = {r["name"]: r for r in response.json()["runs"]}
    assert set(runs) == {"raw", "d2l"}
    for name, run in runs.items():
        store = RunStore.open(tiny_runs / name)
        records = store.read_metrics()
        config = store.config.to_dict()
        config["data"]["corpus"] = "corpus.txt"
        assert run["config"] == config and run["vocab_size"] == len(store.vocab)
        assert run["prefix"] == ("time traveller" if name == "d2l" else "")  # what the page offers: the book's prefix for its mode
        assert run["cell"] == "lstm"
        assert run["trained"] is True and run["epochs"] == 3 and run["last"] == records[-1]
        validated = [r for r in records if r["val_perplexity"] is not None]
        best = min(validated, key=lambda r: r["val_perplexity"]) if validated else None
        assert run["best"] == (best and {"epoch": best["epoch"], "val_perplexity": best["val_perplexity"], "val_bpc": best["val_bpc"]})


def test_the_books_gru_is_listed_by_its_form(tmp_path: Path) -> None:
    """The page named a d2l GRU 'gru scratch', as it does nn.GRU's form; `lstmlm runs` says 'gru (d2l)'."""
    from lstmlm.config import Config
    from lstmlm.serve.catalog import list_runs
    from lstmlm.vocab import Vocab

    cfg = Config().with_overrides({"cell": "gru", "gru_form": "d2l", "hidden": 8})
    RunStore.create(tmp_path / "book-gru", cfg, Vocab.build("ab"))
    RunStore.create(tmp_path / "gru", cfg.with_overrides({"gru_form": "cudnn"}), Vocab.build("ab"))
    assert {r["name"]: r["cell"] for r in list_runs(tmp_path)} == {"book-gru": "gru (d2l)", "gru": "gru"}


def test_metrics_follow_a_training_and_stay_strict_json(runs_copy: Path) -> None:
    with client(runs_copy) as api:
        before = api.get("/api/runs/raw/metrics").json()
        assert before == {"run": "raw", "epochs": RunStore.open(runs_copy / "raw").read_metrics(), "baselines": before["baselines"]}
        assert before["baselines"]["bigram"] < before["baselines"]["unigram"]  # the chart's lines (test_baselines.py)
        RunStore.open(runs_copy / "raw").append_metrics({"epoch": 4, "train_perplexity": math.inf, "val_perplexity": 9.5})
        after = api.get("/api/runs/raw/metrics")
        strict_json(after.text)  # infinity travels as null
        assert after.json()["epochs"][-1] == {"epoch": 4, "train_perplexity": None, "val_perplexity": 9.5}
        assert api.get("/api/runs").json()["runs"][0]["name"] == "raw"  # the run trained last comes first


def test_a_run_still_in_its_first_epoch_is_listed_but_cannot_generate(runs_copy: Path) -> None:
    young = runs_copy / "young"
    young.mkdir()
    shutil.copy(runs_copy / "raw" / "config.json", young)
    shutil.copy(runs_copy / "raw" / "vocab.json", young)
    with client(runs_copy) as api:
        listed = {r["name"]: r for r in api.get("/api/runs").json()["runs"]}["young"]
        assert listed["trained"] is False and listed["epochs"] == 0 and listed["best"] is None
        assert api.get("/api/runs/young/metrics").json() == {"run": "young", "epochs": [], "baselines": None}
        assert_error(api.post("/api/generate", json={"run": "young", "prefix": "the"}), 409, "run young has no checkpoint yet")


def test_one_model_per_run_reused_until_training_writes_a_new_checkpoint(runs_copy: Path) -> None:
    app = create_app(runs_copy)
    body = {"run": "raw", "prefix": "the", "length": 60, "stream": False}
    with TestClient(app) as api:
        first = api.post("/api/generate", json=body).json()["text"]
        models = app.state.models
        loaded = models.get("raw")
        api.post("/api/generate", json=body)
        assert models.get("raw") is loaded  # not read again
        path = runs_copy / "raw" / "latest.pt"
        payload = torch.load(path, weights_only=True)  # a checkpoint holds tensors and plain values only
        payload["model"] = {k: -v for k, v in payload["model"].items()}  # a training step of sorts
        torch.save(payload, path)
        assert models.get("raw") is not loaded
        assert api.post("/api/generate", json=body).json()["text"] != first


# ---- the model cache: bounded, the least recently used let go, a deleted run forgotten --------------------


def generated(api: TestClient, run: str) -> None:
    response = api.post("/api/generate", json={"run": run, "prefix": "the", "length": 20, "stream": False})
    assert response.status_code == 200, response.text


def test_the_cache_holds_at_most_max_models_and_lets_the_least_recently_used_go(runs_copy: Path) -> None:
    names = copies(runs_copy, 4)
    app = create_app(runs_copy, Limits(max_models=2))
    models = app.state.models
    with TestClient(app) as api:
        generated(api, names[0])
        first = weakref.ref(models.get(names[0]).trained.model)  # already the most recent: the order stays
        for name in names[1:]:
            generated(api, name)
        assert models.held() == [(names[2], False), (names[3], False)]
        assert api.get("/api/status").json()["models"] == 2
        gc.collect()
        assert first() is None  # let go of, not merely forgotten: nothing else holds the model
        generated(api, names[2])  # used again: now the most recent
        generated(api, names[0])
        assert models.held() == [(names[2], False), (names[0], False)]


def test_a_model_let_go_while_a_generation_holds_it_is_taken_back_not_loaded_again(tiny_runs: Path) -> None:
    """With --max-models 1, a run asked for while another's model is loaded, then asked for again
    while its first generation still streams, gets the model that generation holds: one copy,
    and its requests in one batch. It was loaded again, its rows in batches of their own (7
    copies of two models at once under load), past --max-batch and --max-model-mib."""
    with client(tiny_runs, max_models=1, lanes=1, max_length=10**8, deadline_s=120) as api:
        models = api.app.state.models  # type: ignore[attr-defined]
        long = {"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}
        with api.stream("POST", "/api/generate", json=long) as first:
            assert next(first.iter_lines()) == "event: start" and status_until(api, running=1)["running"] == 1
            held = models.get("raw")
            generated(api, "d2l")  # the cache lets raw's model go; the stream holds it
            assert models.held() == [("d2l", False)]
            with api.stream("POST", "/api/generate", json=long) as second:
                assert next(second.iter_lines()) == "event: start"
                status = status_until(api, running=2)
                assert (status["running"], status["batches"], status["models"]) == (2, 1, 1)
                assert models.get("raw") is held and models.held() == [("raw", False)]
        assert status_until(api, running=0, batches=0)["batches"] == 0


def test_the_cache_holds_at_most_max_model_mib_of_weights(runs_copy: Path) -> None:
    names = copies(runs_copy, 3)
    nbytes = create_app(runs_copy).state.models.get(names[0]).nbytes
    app = create_app(runs_copy, Limits(max_model_mib=1.5 * nbytes / 2**20))  # room for one model, not two
    with TestClient(app) as api:
        for name in names:
            generated(api, name)
            assert app.state.models.held() == [(name, False)]


def test_a_deleted_run_is_forgotten(runs_copy: Path) -> None:
    names = copies(runs_copy, 2)
    app = create_app(runs_copy)
    with TestClient(app) as api:
        for name in names:
            generated(api, name)
        shutil.rmtree(runs_copy / names[0])
        assert api.get("/api/status").json()["models"] == 1
        assert app.state.models.held() == [(names[1], False)]
        assert_error(api.post("/api/generate", json={"run": names[0], "prefix": "the"}), 404, f"no run named '{names[0]}'")
        (runs_copy / names[1] / "latest.pt").unlink()  # a checkpoint gone is a model gone
        assert api.get("/api/runs").status_code == 200 and app.state.models.held() == []


# ---- the body's size, the Host header -------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_from_its_length_or_once_read(tiny_runs: Path) -> None:
    with client(tiny_runs, max_text=1000) as api:
        most = api.get("/api/status").json()["max_body"]
        json_body = {"content-type": "application/json"}
        big = api.post("/api/generate", content=b" " * (most + 1), headers=json_body)
        assert_error(big, 413, f"the request body ({most + 1:,} bytes) is over this server's limit of {most:,} bytes", "1,000 characters")

        def chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:  # no Content-Length: sent chunked
            yield from (body[i : i + size] for i in range(0, len(body), size))

        assert_error(api.post("/api/generate", content=chunks(b" " * (10 * most)), headers=json_body), 413, "the request body is over this server's limit")
        body = json.dumps({"run": "raw", "prefix": "the", "length": 30, "stream": False}).encode()
        whole = api.post("/api/generate", content=body, headers=json_body).json()
        assert api.post("/api/generate", content=chunks(body, 7), headers=json_body).json() == whole  # a chunked body that fits is read as sent


def test_the_largest_request_max_text_allows_fits_the_body_limit(api: TestClient) -> None:
    body = json.dumps({"run": "raw", "prefix": "\U0001f600" * 5000, "stop": ["\U0001f600" * 100] * 16, "length": 10**4, "temperature": 1.5})
    assert len(body) > 12 * 6000  # every character escaped as a surrogate pair, as JSON may
    response = api.post("/api/generate", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "prefix characters outside the model's vocabulary")  # read, and judged on its content


def test_a_stop_string_the_model_never_writes_is_a_422_and_frees_its_place(api: TestClient) -> None:
    body = {"run": "d2l", "prefix": "the", "length": 30, "stream": False, "stop": ["The", "\n"]}
    assert_error(api.post("/api/generate", json=body), 422, "the stop string '\\n' can never appear")
    assert api.get("/api/status").json()["queued"] == 0  # the request left the queue it was counted in
    assert api.post("/api/generate", json={**body, "stop": ["The"]}).status_code == 200  # read as 'the'


def test_the_host_check_answers_ip_addresses_and_its_own_names_only(tiny_runs: Path) -> None:
    with TestClient(create_app(tiny_runs, allowed_hosts=["localhost", "127.0.0.1", "::1", "Lab.Example"])) as api:
        for host in ("localhost:8000", "LOCALHOST.", "lab.example", "127.0.0.2:80", "10.1.2.3", "[::1]:8000", "[fe80::1]"):
            assert api.get("/api/status", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "localhost.evil.example", "lab.example.evil:80", "127.0.0.1.nip.io"):
            answer = api.get("/api/status", headers={"host": host})
            assert_error(answer, 400, "this server answers requests for lab.example, localhost or an IP address only", "--allowed-host")


# ---- bad data on disk, symbolic links, server paths ------------------------------------------------------

BAD_FILES = [
    ("metrics.jsonl", '{"epoch": 1}\n42\n', "run bad's metrics.jsonl has a line that is not a JSON object"),
    ("metrics.jsonl", '{"epoch": 1}\n["a"]\n', "not a JSON object"),
    ("metrics.jsonl", "[" * 100_000 + "\n", "nested too deeply"),
    ("metrics.jsonl", '{"epoch": ' + "9" * 5000 + "}\n", "has a number too long to read"),
    ("metrics.jsonl", "\udcff\n", "cannot read bad/metrics.jsonl"),
    ("config.json", "{", "run bad has an unreadable config"),
    ("config.json", "[]", "run bad"),
    ("config.json", '{"data": 5}', "run bad"),
    ("vocab.json", "{}", "run bad has an unreadable vocabulary"),
    ("vocab.json", None, "run bad has an unreadable vocabulary"),  # removed
]


@pytest.mark.parametrize(("file", "content", "why"), BAD_FILES)
def test_a_run_with_bad_files_is_listed_as_unreadable_and_the_others_are_listed(runs_copy: Path, file: str, content: str | None, why: str) -> None:
    bad = runs_copy / "bad"
    shutil.copytree(runs_copy / "raw", bad)
    if content is None:
        (bad / file).unlink()
    else:
        (bad / file).write_bytes(content.encode("utf-8", "surrogateescape"))
    with client(runs_copy) as api:
        response = api.get("/api/runs")
        assert response.status_code == 200 and str(runs_copy) not in response.text
        runs = {r["name"]: r for r in response.json()["runs"]}
        assert set(runs) == {"raw", "d2l", "bad"} and "error" not in runs["raw"] and "error" not in runs["d2l"]
        assert list(runs["bad"]) == ["name", "error"] and why in runs["bad"]["error"] and "\n" not in runs["bad"]["error"]
        if file == "metrics.jsonl":
            metrics = api.get("/api/runs/bad/metrics")
            assert_error(metrics, 500, why)
            assert str(runs_copy) not in metrics.text


@pytest.mark.parametrize(("name", "fragment"), [("a" * 256, "at most 255 bytes, and 'aaaa"), ("\u00e9" * 128, "has 256"), ("\ud800", "not a plain name")])
def test_a_run_name_too_long_for_a_file_is_400(api: TestClient, name: str, fragment: str) -> None:
    json_body = {"content-type": "application/json"}  # json.dumps escapes a lone surrogate, as a client may send it
    assert_error(api.post("/api/generate", content=json.dumps({"run": name, "prefix": "the"}), headers=json_body), 400, fragment)
    assert_error(api.post("/api/inspect", content=json.dumps({"run": name, "text": "the"}), headers=json_body), 400, fragment)
    if name.isalpha():
        assert_error(api.get(f"/api/runs/{name}/metrics"), 400, fragment)
    assert api.post("/api/generate", json={"run": "a" * 255, "prefix": "the"}).status_code == 404  # the longest name a file can have


def test_a_symbolic_link_in_the_runs_directory_is_no_run(runs_copy: Path, tmp_path: Path) -> None:
    shutil.copytree(runs_copy / "raw", tmp_path / "elsewhere")
    (runs_copy / "out").symlink_to(tmp_path / "elsewhere")
    (runs_copy / "alias").symlink_to(runs_copy / "raw")  # even a link to a run of its own: a run is a directory
    with client(runs_copy) as api:
        assert {r["name"] for r in api.get("/api/runs").json()["runs"]} == {"raw", "d2l"}
        for name in ("out", "alias"):
            assert_error(api.post("/api/generate", json={"run": name, "prefix": "the"}), 404, f"no run named '{name}'", "is a symbolic link")
            assert_error(api.post("/api/inspect", json={"run": name, "text": "the"}), 404, "is a symbolic link")
            assert_error(api.get(f"/api/runs/{name}/metrics"), 404, "is a symbolic link")
        generated(api, "raw")
        os.replace(runs_copy / "raw", runs_copy / "moved")
        (runs_copy / "raw").symlink_to(runs_copy / "moved")  # a run turned into a link is no longer served, loaded or not
        assert_error(api.post("/api/generate", json={"run": "raw", "prefix": "the"}), 404, "is a symbolic link")


def test_errors_show_no_path_of_the_server_s(runs_copy: Path) -> None:
    (runs_copy / "raw" / "latest.pt").write_bytes(b"not a checkpoint")
    with client(runs_copy) as api:
        response = api.post("/api/generate", json={"run": "raw", "prefix": "the"})
        assert_error(response, 500, "raw/latest.pt is corrupt or truncated")
        assert str(runs_copy) not in response.text


def test_an_internal_error_is_500_with_one_line_of_json(tiny_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(runs_dir: Path) -> list[dict[str, Any]]:
        raise RuntimeError(f"a bug, at {runs_dir}")

    monkeypatch.setattr("lstmlm.serve.app.list_runs", broken)
    with TestClient(create_app(tiny_runs), raise_server_exceptions=False) as api:
        response = api.get("/api/runs")
        assert_error(response, 500, "internal error (RuntimeError)")
        assert str(tiny_runs) not in response.text


# ---- the page -----------------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served_from_the_package(api: TestClient) -> None:
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js">' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = api.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert "http://" not in response.text and "https://" not in response.text  # no network resources
    assert_error(api.get("/static/../runs.py"), 404)


def test_status_reports_the_limits_and_the_work_in_flight(tiny_runs: Path) -> None:
    with client(tiny_runs, max_length=123, max_concurrent=2, deadline_s=9.0, max_batch=5, queue=7, lanes=3) as api:
        assert api.get("/api/status").json() == {
            "version": "0.1.0", "active": 0, "running": 0, "queued": 0, "inspecting": 0, "batches": 0, "models": 0,
            "max_length": 123, "max_text": 5000, "max_concurrent": 2, "deadline_s": 9.0,
            "max_models": 4, "max_model_mib": 1024.0, "max_connections": 256, "header_timeout_s": 10.0, "body_timeout_s": 30.0,
            "max_batch": 5, "queue": 7, "threads": 1, "lanes": 3, "max_body": 12 * (5000 + 1600) + 16384,
        }  # fmt: skip


# ---- bounds ---------------------------------------------------------------------------------------------


def test_a_generation_ends_at_the_deadline_with_what_it_made(tiny_runs: Path) -> None:
    with client(tiny_runs, max_length=10**9, deadline_s=0.3) as api:
        _, done, text = streamed(api, run="raw", prefix="the", length=10**9, temperature=1.0)
        assert done["finish_reason"] == "deadline" and 0 < done["characters"] == len(text) < 10**9
        whole = api.post("/api/generate", json={"run": "raw", "prefix": "the", "length": 10**9, "stream": False}).json()
        assert whole["finish_reason"] == "deadline" and 0 < whole["characters"] < 10**9
        assert api.get("/api/status").json()["active"] == 0


class MadeRow:
    """A batch's row whose `made` characters are made, none read yet, the generation going on."""

    failed = None

    def __init__(self, made: int) -> None:
        self.made, self.read = made, 0

    def unread(self) -> int:
        return self.made - self.read

    def finished(self) -> bool:
        return False


def test_at_the_deadline_a_stream_ends_with_what_a_stop_string_held_back() -> None:
    """'ab' might have begun the stop string 'abd!': held back, and lost when the deadline came
    (where the length coming first gives it, as `lstmlm generate` prints it)."""
    steps = Continuation(iter([[[c] for c in "abcab"]]), ("abd!",), 1)
    assert take(MadeRow(5), steps, deadline=0.0) == ("abcab", "deadline")  # type: ignore[arg-type]
    assert steps.text == ["abcab"]


def status_until(api: TestClient, **expected: int) -> dict[str, Any]:
    """/api/status once it shows `expected` (within 10 s), else as it stands."""
    for _ in range(200):
        status = api.get("/api/status").json()
        if all(status[k] == v for k, v in expected.items()):
            break
        __import__("time").sleep(0.05)
    return dict(status)


def test_requests_past_the_queue_are_refused_with_503_and_their_rows_come_back(tiny_runs: Path) -> None:
    with client(tiny_runs, max_batch=1, queue=1, max_length=10**8, deadline_s=120) as api:
        long = {"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}
        with api.stream("POST", "/api/generate", json=long) as first:
            assert next(first.iter_lines()) == "event: start"
            assert status_until(api, running=1)["running"] == 1  # the batch's one place is taken
            with api.stream("POST", "/api/generate", json=long) as second:
                assert second.status_code == 200 and status_until(api, queued=1)["queued"] == 1  # waits for a place
                busy = api.post("/api/generate", json={"run": "raw", "prefix": "the"})
                assert_error(busy, 503, "busy: 1 requests wait for a place")
                assert busy.headers["retry-after"] == "1"
        # both clients hung up: their rows were let go, and the batch has ended
        status = status_until(api, running=0, queued=0, batches=0)
        assert (status["running"], status["queued"], status["batches"], status["active"]) == (0, 0, 0, 0)
        assert api.post("/api/generate", json={"run": "raw", "prefix": "the", "stream": False}).status_code == 200


def test_a_queued_request_whose_client_hangs_up_gives_its_place_in_the_queue_back_at_once(tiny_runs: Path) -> None:
    with client(tiny_runs, max_batch=1, queue=1, max_length=10**8, deadline_s=120) as api:
        long = {"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}
        with api.stream("POST", "/api/generate", json=long) as first:
            assert next(first.iter_lines()) == "event: start" and status_until(api, running=1)["running"] == 1
            with api.stream("POST", "/api/generate", json=long) as second:
                assert next(second.iter_lines()) == "event: start" and status_until(api, queued=1)["queued"] == 1
            # the first still holds the batch's one place: the second left the queue, not waited in it for a place
            status = status_until(api, queued=0)
            assert (status["running"], status["queued"]) == (1, 0)
            with api.stream("POST", "/api/generate", json=long) as third:  # admitted, not refused as busy
                assert third.status_code == 200 and status_until(api, queued=1)["queued"] == 1
        assert status_until(api, running=0, queued=0, batches=0)["active"] == 0


def test_the_largest_temperature_and_top_k_a_request_may_ask_for_generate(api: TestClient) -> None:
    body = {**GOOD, "length": 20, "stream": False, "temperature": 3.4028234663852886e38, "top_k": 2**63 - 1, "seed": 1}
    whole = api.post("/api/generate", json=body).json()
    assert whole["finish_reason"] == "length" and whole["characters"] == len(whole["text"]) >= 20  # 20 tokens; "<unk>" is 5 characters


def test_a_failed_batch_ends_its_requests_with_an_error_and_logs_one_line(
    tiny_runs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a text cut short as if it were whole ("length"), and not a traceback in the log."""
    from lstmlm.choosing import Rows

    def broken(self: Rows, *args: Any) -> None:
        raise RuntimeError("a bug in the batch")

    monkeypatch.setattr(Rows, "add", broken)
    with client(tiny_runs) as api:
        got = sse_events(api.post("/api/generate", json={**GOOD, "length": 100}).text)
        message = "internal error (RuntimeError): the generation's batch failed; the server's log says more"
        assert [name for name, _ in got] == ["start", "error"] and got[1][1] == {"error": message}
        assert_error(api.post("/api/generate", json={**GOOD, "length": 100, "stream": False}), 500, message)
        status = status_until(api, running=0, queued=0, batches=0)
        assert (status["running"], status["queued"], status["batches"]) == (0, 0, 0)
    logged = [r for r in caplog.records if r.name == "uvicorn.error"]
    assert [r.getMessage() for r in logged][:1] == ["a batch of run raw failed: RuntimeError: a bug in the batch"] and logged[0].exc_info is None


def test_a_fault_in_a_stream_ends_it_with_an_error_event_and_logs_one_line(
    tiny_runs: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault of the server's own while a stream runs ends it with its `error` event, as a
    failed batch does: it was cut off without an end (a client read an incomplete response),
    as a bytes model's stream at the deadline was before f850b3b."""

    def broken(self: Continuation, n: int) -> list[Any]:
        raise RuntimeError("a bug in the stream")

    monkeypatch.setattr(Continuation, "several", broken)
    with client(tiny_runs) as api:
        got = sse_events(api.post("/api/generate", json={**GOOD, "length": 100}).text)
        assert [name for name, _ in got] == ["start", "error"]
        assert got[1][1] == {"error": "internal error (RuntimeError): the server's log says more"}
        status = status_until(api, running=0, queued=0, batches=0)
        assert (status["running"], status["queued"], status["batches"]) == (0, 0, 0)
    logged = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert logged == ["a streamed generation of run raw failed: RuntimeError: a bug in the stream"]


def test_a_models_rows_are_spread_over_its_lanes_which_share_its_places(tiny_runs: Path) -> None:
    """Two lanes share a batch of 3 places, 2 and 1: a row goes to the lane with a place free and
    the fewest rows, each lane a batch of its own; a fourth waits for a place."""
    with client(tiny_runs, max_batch=3, queue=4, lanes=2, max_length=10**8, deadline_s=120) as api:
        assert api.app.state.batches.places == [2, 1]  # type: ignore[attr-defined]
        long = {"run": "raw", "prefix": "the", "length": 10**8, "temperature": 1.0}
        with ExitStack() as streams:
            for n in (1, 2, 3):
                response = streams.enter_context(api.stream("POST", "/api/generate", json=long))
                assert next(response.iter_lines()) == "event: start"
                status = status_until(api, running=n)
                assert (status["running"], status["batches"]) == (n, min(n, 2))
            lanes = sorted(len(batch.rows) for batch in api.app.state.batches.batches.values())  # type: ignore[attr-defined]
            assert lanes == [1, 2]
            streams.enter_context(api.stream("POST", "/api/generate", json=long))
            assert status_until(api, queued=1)["queued"] == 1
        status = status_until(api, running=0, queued=0, batches=0)
        assert (status["running"], status["queued"], status["batches"]) == (0, 0, 0)


def test_the_runs_prime_is_read_once_a_model_and_each_request_reads_its_prefix_from_it(tiny_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request reads only its prefix; the prime, read once, is shared (and not changed by
    the requests that step from it: the third streams what the first did)."""
    from lstmlm.serve import batching

    reads: list[int] = []
    real = batching.read
    monkeypatch.setattr(batching, "read", lambda model, vocab, tokens, *rest: reads.append(len(tokens)) or real(model, vocab, tokens, *rest))
    with client(tiny_runs) as api:
        prime = api.app.state.models.get("raw").trained.prime  # type: ignore[attr-defined]
        assert len(prime) > 20  # the tiny run has a prime to read
        body = {"run": "raw", "prefix": "the", "length": 40, "temperature": 1.0, "seed": 3}
        first = streamed(api, **body)[2]
        streamed(api, **{**body, "prefix": "and", "seed": 4})
        assert streamed(api, **body)[2] == first
        streamed(api, **body, prime=False)  # no prime: nothing to read
    assert reads == [len(prime)]


def test_a_batch_of_one_place_has_one_lane(tiny_runs: Path) -> None:
    with client(tiny_runs, max_batch=1, lanes=4) as api:
        assert api.app.state.batches.places == [1]  # type: ignore[attr-defined]


def test_inspections_beyond_the_concurrency_limit_are_refused_at_once(tiny_runs: Path) -> None:
    with client(tiny_runs, max_concurrent=1) as api:
        api.app.state.slots.take()  # type: ignore[attr-defined]  # one inspection running
        assert_error(api.post("/api/inspect", json={"run": "raw", "text": "the"}), 503, "busy")
        api.app.state.slots.give()  # type: ignore[attr-defined]
        assert api.post("/api/inspect", json={"run": "raw", "text": "the"}).status_code == 200


# ---- bad requests: 4xx, one line of JSON -----------------------------------------------------------------

GOOD = {"run": "raw", "prefix": "the"}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({**GOOD, "run": "nope"}, 404, "no run named 'nope'"),
        ({**GOOD, "run": "../raw"}, 400, "not a plain name"),
        ({**GOOD, "run": "/etc"}, 400, "not a plain name"),
        ({**GOOD, "run": ".."}, 400, "not a plain name"),
        ({**GOOD, "length": 10_001}, 422, "length 10,001 is over this server's limit of 10,000"),
        ({**GOOD, "prefix": "the " * 1300}, 422, "the prefix has 5,200 characters, over this server's limit of 5,000"),
        ({**GOOD, "bogus": 1}, 422, "unknown field 'bogus'"),
        ({"prefix": "the"}, 422, "missing field 'run'"),
        ({**GOOD, "length": "50"}, 422, "length: Input should be a valid integer"),
        ({**GOOD, "length": -1}, 422, "length: Input should be greater than or equal to 0"),
        ({**GOOD, "temperature": -0.5}, 422, "temperature"),
        ({**GOOD, "top_p": 1.5}, 422, "top_p"),
        ({**GOOD, "min_p": -1}, 422, "min_p"),
        ({**GOOD, "seed": -3}, 422, "seed"),
        ({**GOOD, "temperature": 1e39}, 422, "temperature: Input should be less than or equal to"),  # past float32: the batch could not hold it
        ({**GOOD, "top_k": 2**63}, 422, "top_k: Input should be less than or equal to 9223372036854775807"),  # past int64
        ({**GOOD, "stop": [""]}, 422, "stop.0"),
        ({**GOOD, "stop": ["x"] * 17}, 422, "stop"),
        ({**GOOD, "prefix": "THE"}, 422, "prefix characters outside the model's vocabulary: 'E' 'H' 'T'"),
        ({**GOOD, "prefix": ""}, 422, "the prefix is empty"),
        ([GOOD], 400, "the body must be a JSON object"),
    ],
)
def test_bad_generate_requests_are_4xx_with_one_line(api: TestClient, body: Any, status: int, fragment: str) -> None:
    assert_error(api.post("/api/generate", json=body), status, fragment)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"run": "raw", "text": "the", "gate": "memory"}, 422, "gate"),
        ({"run": "raw", "text": "the", "layer": 2}, 422, "layer 2 does not exist: the model has layers 0..1"),
        ({"run": "raw", "text": "the", "units": [16]}, 422, "unit 16 does not exist: the layer has units 0..15"),
        ({"run": "raw", "text": ""}, 422, "the text to inspect is empty"),
        ({"run": "raw", "text": "x" * 5001}, 422, "the text has 5,001 characters"),
        ({"run": "raw", "text": "the", "top": 99}, 422, "top"),
        ({"run": "a/b", "text": "the"}, 400, "not a plain name"),
        ({"run": "nope", "text": "the"}, 404, "no run named"),
    ],
)
def test_bad_inspect_requests_are_4xx_with_one_line(api: TestClient, body: Any, status: int, fragment: str) -> None:
    assert_error(api.post("/api/inspect", json=body), status, fragment)


@pytest.mark.parametrize(
    ("route", "body"), [("/api/inspect", '{"run": "raw", "text": "th\\udc00e"}'), ("/api/generate", '{"run": "raw", "prefix": "th\\ud800e"}')]
)
def test_a_lone_surrogate_is_no_character_and_is_422(api: TestClient, route: str, body: str) -> None:
    # JSON may escape one; an inspection sent it back in its text and could not encode it: a 500
    response = api.post(route, content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "'\\ud", "is a lone surrogate, not a character")
    assert "Value error" not in response.json()["error"]


def test_malformed_json_is_400_and_nan_is_no_number(api: TestClient) -> None:
    json_body = {"content-type": "application/json"}
    assert_error(api.post("/api/generate", content='{"run": "raw", "prefix": ', headers=json_body), 400, "the body is not valid JSON")
    assert_error(api.post("/api/generate", content='{"run": "raw", "prefix": "a", "temperature": NaN}', headers=json_body), 422, "temperature")


def test_a_body_not_sent_as_json_is_400(api: TestClient) -> None:
    assert_error(api.post("/api/generate", content=json.dumps(GOOD)), 400, "Content-Type: application/json")


def test_unknown_routes_methods_and_run_names_in_paths(api: TestClient) -> None:
    assert_error(api.get("/api/nothing"), 404, "no such page")
    assert_error(api.get("/api/generate"), 405)
    assert_error(api.get("/api/runs/nope/metrics"), 404, "no run named 'nope'")
    assert_error(api.get("/api/runs/%2E%2E/metrics"), 400, "not a plain name")


def test_serve_without_the_extra_is_a_one_line_hint(tiny_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert_one_error_line(cli("serve", "--runs-dir", tiny_runs, "--port", "0"), "lstmlm serve needs FastAPI and uvicorn: pip install 'lstmlm[serve]'")


@pytest.mark.parametrize(
    ("field", "flag"), [("max_batch", "--max-batch"), ("queue", "--queue"), ("threads", "--threads"), ("lanes", "--lanes"), ("deadline_s", "--deadline")]
)
def test_a_limit_of_zero_is_refused_by_its_flag(field: str, flag: str) -> None:
    with pytest.raises(ServeError, match=f"^{flag} must be positive, not 0$"):
        Limits(**{field: 0})
    with pytest.raises(ServeError, match=f"^{flag} must be positive"):
        Limits(**{field: math.nan})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_length", "5", "--max-length must be an int, not '5'"),
        ("threads", 2.5, "--threads must be an int, not 2.5"),
        ("deadline_s", "60", "--deadline must be a float, not '60'"),
    ],
)
def test_a_limit_of_the_wrong_type_is_refused_by_its_flag(field: str, value: object, message: str) -> None:
    """A library caller's string was a TypeError from the bound's comparison; a float count was taken."""
    with pytest.raises(ServeError, match=f"^{re.escape(message)}$"):
        Limits(**{field: value})  # type: ignore[arg-type]
    assert Limits(deadline_s=5).deadline_s == 5  # an int for a float is fine
