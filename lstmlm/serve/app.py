"""The HTTP API and the page, on FastAPI: every route a thin layer over the library.

    GET  /                           the page (static/index.html)
    GET  /api/runs                   the runs: config, vocabulary size, best validation, last epoch
    GET  /api/runs/{name}/metrics    a run's epochs (metrics.jsonl) and baselines, for a chart that follows training
    POST /api/generate               a prefix continued: server-sent events, or JSON with "stream": false
    POST /api/inspect                a text's gates, per character (units.inspect_text)
    GET  /api/status                 the limits, the batches, the rows stepping and the queue

A generation is a row of its model's batch (`batching.py`): primed in a worker thread, queued
until the batch has a place (at most `Limits.queue` requests wait; more are refused at once
with 503 and Retry-After), then stepped with every other request of the same model and
checkpoint — the text `lstmlm generate` prints for the same options. Its text is read by the
event loop, which looks every few milliseconds and takes what has come without waiting (one event
for each LINGER's characters), so it never waits on the model and no thread waits a row; it ends
at its deadline with what it made, and its row is let go however the request ends: done,
failed, or its client gone (the response's `__call__` releases it, even for a stream never
started). An inspection holds one of `Limits.max_concurrent` slots (more are refused with 503).

Before any route (guards.py, access.py): a request whose Host names no name of this server's is
refused (DNS rebinding), one without the server's token (where it has one) is refused, and a
body over `Limits.max_body` is refused without being read whole.

Errors are one-line JSON, {"error": "..."}: 400 malformed JSON, a path-like or overlong run
name, or a Host not this server's; 401 no token or a wrong one; 404 an unknown run or route (a symbolic link in the runs
directory is no run); 409 a run without a checkpoint yet; 413 a body too large; 422 a field
out of bounds or unknown; 500 a run's files unreadable or an internal error; 503 busy. No
message shows a path of the server's outside its runs directory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .. import __version__
from ..errors import CheckpointError, ConfigError, InspectError, LstmlmError, ServeError, VocabError
from . import Limits
from .access import Access, TokenCheck
from .batching import POLL, Batches, QueueFull, Row, lanes_for
from .bodies import GenerateRequest, InspectRequest, describe
from .catalog import Loaded, Models, NoCheckpoint, NotServed, finite, list_runs, open_run, read_records, run_baselines, shown, without_paths
from .guards import BodyLimit, HostCheck, one_line

if TYPE_CHECKING:
    from ..generate import Continuation

STATIC = Path(__file__).resolve().parent / "static"
MOST = 512  # characters an event carries at most
LINGER = 0.05  # seconds a stream's characters gather into one event, after its first (which goes at once): 20 a second
INLINE_PREFIX = 64  # characters of a prefix read on the event loop itself (about a millisecond), not in a worker thread
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class Slots:
    """At most `n` inspections at once; `take` answers at once, never waits."""

    def __init__(self, n: int) -> None:
        self.n, self.active = n, 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.active >= self.n:
                raise ApiError(503, f"busy: {self.n} inspections are running, as many as this server runs at once; try again shortly", {"Retry-After": "1"})
            self.active += 1

    def give(self) -> None:
        with self._lock:
            self.active -= 1


class EventStream(StreamingResponse):
    """Server-sent events that run `release` when the response ends, however it ends."""

    def __init__(self, events: AsyncGenerator[str, None], release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.release = events, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.events.aclose()
            self.release()


def event(name: str, data: dict[str, Any]) -> str:
    """One server-sent event; the data is JSON, so a line break in the text is escaped."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def take(row: Row, steps: Continuation, deadline: float, most: int = MOST) -> tuple[str, str | None]:
    """The text the batch has made for `row` since the last look (at most `most` characters),
    without waiting, and why the generation ended ("length", "stop", "deadline"; None: it goes on).
    ServeError where its batch failed."""
    if row.failed is not None:
        raise ServeError(row.failed)
    n = min(row.unread(), most)
    made = steps.several(n)
    row.read += n
    parts = [chars[0] for chars in made]
    if len(made) < n or row.finished():  # the steps ended: a stop string, or the row's end
        parts += [chars[0] for chars in steps]  # what a stop string held back, where the length came first
        return "".join(parts), "stop" if steps.ended[0] is not None else "length"
    if time.monotonic() >= deadline:  # it ends here, with what a stop string held back, as at its length
        return "".join([*parts, steps.end_here()[0]]), "deadline"
    return "".join(parts), None


async def pause(row: Row, made: int, deadline: float) -> None:
    """Wait for a row's characters: a few milliseconds before the first (it goes out at once),
    LINGER after it (the characters of that time gather into one event), never past the
    deadline; not at all where more have come than one event took."""
    if not row.unread():
        await anyio.sleep(max(0.0, min(POLL if not made else LINGER, deadline - time.monotonic())))


def create_app(
    runs_dir: Path, limits: Limits = Limits(), device: str = "cpu", precision: str = "fp32", allowed_hosts: list[str] | None = None, access: Access = Access()
) -> FastAPI:
    """The app over the runs in `runs_dir`. `allowed_hosts` (the Host header's names; None:
    any) keeps the server from answering pages that rebind a name of theirs to its address;
    `access.token` (None: none) is what every request must carry."""
    app = FastAPI(title="lstmlm", version=__version__, docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.add_middleware(BodyLimit, limits=limits)
    if access.token is not None:  # before the body is read, after the Host is checked
        app.add_middleware(TokenCheck, token=access.token, secure=access.tls)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last, so it runs first
    served = Served(runs_dir, limits, device, precision)
    app.state.models, app.state.slots, app.state.batches = served.models, served.slots, served.batches
    answer_errors(app, runs_dir)
    add_page(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_runs(app, served)
    add_generation(app, served)
    add_inspection(app, served)
    return app


class Served:
    """What the routes share: the runs directory, the limits, the models loaded, the inspections'
    slots and the generations' batches."""

    def __init__(self, runs_dir: Path, limits: Limits, device: str, precision: str) -> None:
        self.runs_dir = runs_dir
        self.models = Models(runs_dir, device, precision, limits.max_models, int(limits.max_model_mib * 2**20))
        self.limits = replace(limits, lanes=limits.lanes or lanes_for(device))
        self.slots = Slots(self.limits.max_concurrent)
        self.batches = Batches(self.limits.max_batch, self.limits.queue, self.limits.lanes or 1)

    def run_named(self, name: str) -> str:
        """`name`, where it names a run this server serves; else the answer why not."""
        try:
            open_run(self.runs_dir, name)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        except NotServed as e:
            raise ApiError(404, f"no run named {shown(name)} in this server's runs directory: {e}") from None
        except CheckpointError:
            raise ApiError(404, f"no run named {shown(name)} in this server's runs directory") from None
        return name

    async def load(self, name: str, best: bool) -> Loaded:
        self.run_named(name)
        try:
            held = self.models.current(name, best)  # a look at the checkpoint's stamp: on the event loop, no thread's round trip
            return held if held is not None else await anyio.to_thread.run_sync(self.models.get, name, best)
        except NoCheckpoint as e:
            raise ApiError(409, str(e)) from None

    def within(self, text: str, what: str) -> None:
        if len(text) > self.limits.max_text:
            raise ApiError(422, f"{what} has {len(text):,} characters, over this server's limit of {self.limits.max_text:,}")


def answer_errors(app: FastAPI, runs_dir: Path) -> None:
    """Every error as one line of JSON, with its status."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": one_line(e.message)}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err["type"] == "json_invalid" for err in errors):
            return JSONResponse({"error": "the body is not valid JSON"}, 400)
        if any(err["loc"] == ("body",) for err in errors):  # not an object, or not sent as JSON at all
            return JSONResponse({"error": "the body must be a JSON object, sent with Content-Type: application/json"}, 400)
        return JSONResponse({"error": one_line("; ".join(describe(err) for err in errors))}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        message = "no such page" if e.status_code == 404 else str(e.detail)
        return JSONResponse({"error": one_line(message)}, e.status_code, headers=e.headers)

    @app.exception_handler(LstmlmError)
    async def library_error(_: Request, e: LstmlmError) -> JSONResponse:
        status = 422 if isinstance(e, (ConfigError, VocabError, InspectError)) else 500
        return JSONResponse({"error": one_line(without_paths(str(e), runs_dir))}, status)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        # the server's log has one line on it (uvicorn logs what this handler is given)
        return JSONResponse({"error": f"internal error ({type(e).__name__}): the server's log says more"}, 500)


def add_page(app: FastAPI) -> None:
    """The page at /, under a policy that lets it load only its own files."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: `curl -I`, a monitor's check
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})


def add_runs(app: FastAPI, served: Served) -> None:
    """The runs, a run's metrics and baselines, and the server's own state."""
    models = served.models

    @app.api_route("/api/runs", methods=["GET", "HEAD"])
    async def runs() -> JSONResponse:
        await anyio.to_thread.run_sync(models.forget_gone)
        return JSONResponse({"runs": await anyio.to_thread.run_sync(list_runs, served.runs_dir)})

    @app.api_route("/api/runs/{name}/metrics", methods=["GET", "HEAD"])
    async def metrics(name: str) -> JSONResponse:
        store = open_run(served.runs_dir, served.run_named(name))
        records, found = await anyio.to_thread.run_sync(lambda: (read_records(store), run_baselines(store)))
        return JSONResponse({"run": name, "epochs": finite(records), "baselines": found})

    @app.api_route("/api/status", methods=["GET", "HEAD"])
    async def status() -> JSONResponse:
        await anyio.to_thread.run_sync(models.forget_gone)
        counts = served.batches.status()
        work = {"active": counts["running"] + served.slots.active, "inspecting": served.slots.active, **counts}
        limits = served.limits
        return JSONResponse({"version": __version__, **work, "models": len(models), **vars(limits), "max_body": limits.max_body})


def add_generation(app: FastAPI, served: Served) -> None:
    """A prefix continued in its model's batch: streamed as server-sent events, or whole."""
    limits, batches = served.limits, served.batches

    @app.post("/api/generate", response_model=None)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        sampling = body.sampling()
        if sampling.length > limits.max_length:
            raise ApiError(422, f"length {sampling.length:,} is over this server's limit of {limits.max_length:,} characters")
        served.within(body.prefix, "the prefix")
        loaded = await served.load(body.run, body.best)
        try:
            batches.admit(loaded)
        except QueueFull as e:
            raise ApiError(503, str(e), {"Retry-After": "1"}) from None
        context = loaded.trained.prime if body.prime else ""
        if len(body.prefix) <= INLINE_PREFIX and batches.ready(loaded, context):
            generation, row = batches.submit(loaded, body.prefix, sampling, context)
        else:
            generation, row = await anyio.to_thread.run_sync(batches.submit, loaded, body.prefix, sampling, context)
        reading = Reading(row, generation.steps, time.monotonic() + limits.deadline_s, batches)
        head = {"run": body.run, "prefix": generation.prefix, "normalized": generation.normalized}
        if not body.stream:
            return JSONResponse({**head, **await whole(reading, request)})
        return EventStream(stream(reading, head, served.runs_dir), reading.release)


@dataclass(frozen=True)
class Reading:
    """A generation's row as its request reads it: the text as it comes, until it ends or its deadline."""

    row: Row
    steps: Continuation
    deadline: float
    batches: Batches

    def release(self) -> None:
        """The row let go, however the request ended."""
        self.steps.close()
        self.batches.let_go(self.row)


async def whole(reading: Reading, request: Request) -> dict[str, Any]:
    """The text at once ("stream": false), read as it is made, until it ends or its client goes."""
    made, reason = 0, None
    try:
        while reason is None:
            await pause(reading.row, made, reading.deadline)
            if await request.is_disconnected():  # the client hung up: nobody waits for the rest
                break
            text, reason = take(reading.row, reading.steps, reading.deadline, 1 << 30)
            made += len(text)
    finally:
        reading.release()
    text = reading.steps.text[0]
    return {"text": text, "characters": len(text), "finish_reason": reason}


async def stream(reading: Reading, head: dict[str, Any], runs_dir: Path) -> AsyncGenerator[str, None]:
    """The text as server-sent events: start, text as it comes, then done (or error)."""
    yield event("start", head)
    made = 0
    while True:
        try:
            text, reason = take(reading.row, reading.steps, reading.deadline)
        except LstmlmError as e:
            yield event("error", {"error": one_line(without_paths(str(e), runs_dir))})
            return
        except Exception as e:  # a fault of the server's own: the stream still ends with its event, not cut off
            logging.getLogger("uvicorn.error").error("a streamed generation of run %s failed: %s: %s", head["run"], type(e).__name__, e)
            yield event("error", {"error": f"internal error ({type(e).__name__}): the server's log says more"})
            return
        made += len(text)
        if text:
            yield event("text", {"text": text})
        if reason is not None:
            yield event("done", {"characters": made, "finish_reason": reason})
            return
        await pause(reading.row, made, reading.deadline)


def add_inspection(app: FastAPI, served: Served) -> None:
    """A text's gates, per character, in one of the inspections' slots."""

    @app.post("/api/inspect")
    async def inspect(body: InspectRequest) -> JSONResponse:
        served.within(body.text, "the text")
        loaded = await served.load(body.run, body.best)
        served.slots.take()
        try:
            return JSONResponse(await anyio.to_thread.run_sync(inspection, loaded, body))
        finally:
            served.slots.give()


def inspection(loaded: Loaded, body: InspectRequest) -> dict[str, Any]:
    """`units.inspect_text` on the text, after the prime when asked, as JSON-ready data: the
    chosen units' values and colours (units.colour, the one scale) per character, and per
    character the `top` units furthest from the gate's neutral level."""
    from ..units import check_layer, colour, inspect_text, level, strongest_units
    from ..units_page import hex_colour

    trained = loaded.trained
    context = trained.prime if body.prime else ""
    seen = inspect_text(trained.model, trained.vocab, trained.config.data.normalize, body.text, body.gate, body.layer, body.units or None, None, 3, context)
    gate = seen.gate
    layer = body.layer if body.layer is not None else len(seen.layers) - 1
    acts = check_layer(seen.layers, layer)
    values = acts.gate(gate.name)  # (steps, hiddens)
    units = []
    for _, u in seen.chosen:
        column = values[:, u]
        units.append({"unit": u, "values": rounded(column.tolist()), "colours": [hex_colour(colour(v)) for v in level(gate, column).tolist()]})
    top_units, top_values = strongest_units(acts, gate.name, body.top)
    top = [[[u, v] for u, v in zip(us, rounded(vs))] for us, vs in zip(top_units.tolist(), top_values.tolist())]
    return {
        "run": trained.store.name,
        "text": seen.text,
        "normalized": seen.normalized,
        "unknown": seen.unknown,
        "gate": gate.name,
        "gates": [{"name": g.name, "meaning": g.meaning, "low": g.low, "high": g.high} for g in trained.model.cell.gates],  # the cell's, for the page's choice
        "layer": layer,
        "layers": len(seen.layers),
        "hiddens": acts.num_hiddens,
        "units": units,
        "top": top,
    }


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]
