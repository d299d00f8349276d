"""`lstmlm serve`: trained runs over HTTP — an API and a page — on FastAPI and uvicorn.

    catalog.py      the runs a server offers, their figures, their models (a bounded cache)
    batching.py     continuous batching: a model's generations step together, one thread a batch
    bodies.py       the request bodies, a generation's options derived from generate.Sampling
    guards.py       what a request passes before any route: the Host check, the body's size limit
    app.py          the routes: /api/runs, /api/generate (server-sent events or JSON),
                    /api/inspect, /api/runs/{name}/metrics, /api/status, and the page at /
    connections.py  what one connection may hold: the connection cap, the header and body
                    deadlines, the descriptor limit, a log of one line per kind of failure
    server.py       a socket bound here and uvicorn serving the app on it
    static/      the page: HTML, one script, one style sheet (no build step, no network)

FastAPI and uvicorn are an optional extra (`pip install 'lstmlm[serve]'`); without them the
command says so in one line. The bounds every request lives within are `Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ServeError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from .server import Server

EXTRA_HINT = "lstmlm serve needs FastAPI and uvicorn: pip install 'lstmlm[serve]'"


# The most characters a request carries besides its text: 16 stop strings of 100 (app.GenerateRequest).
OTHER_CHARACTERS = 16 * 100
# The most bytes JSON spends on one character: a character outside the BMP escaped as a surrogate pair.
JSON_BYTES_PER_CHARACTER = len(r"\ud83d\ude00")
BODY_SLACK = 16 * 1024  # the other fields, and whitespace around them


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, how much runs at once, what a connection may hold, and
    how many models stay loaded."""

    max_length: int = 10_000  # characters a generation may ask for
    max_text: int = 5_000  # characters of a prefix or of a text to inspect
    max_concurrent: int = 8  # inspections running at once; more are refused (503)
    deadline_s: float = 60.0  # a generation ends here, with what it has made ("deadline")
    max_models: int = 4  # models kept loaded, the least recently used let go first
    max_model_mib: float = 1024.0  # ... and at most this much of their weights in all
    max_connections: int = 256  # open connections; one more is answered 503 and closed at once
    header_timeout_s: float = 10.0  # a request's line and headers arrive within this, or 408
    body_timeout_s: float = 30.0  # and its body within this after its headers, or 408
    max_batch: int = 64  # generations of one model stepping together; more wait in the queue
    queue: int = 256  # generations waiting for a place in a batch; more are refused (503)
    threads: int = 1  # cores a step uses (torch's intra-op threads in `lstmlm serve`'s process)
    lanes: int | None = None  # batches a model's rows are spread over, each stepping in a thread of its own (None: a core each on a CPU, one on a GPU)

    def __post_init__(self) -> None:
        counts = [self.max_length, self.max_text, self.max_concurrent, self.max_models, self.max_connections, self.max_batch, self.queue, self.threads]
        counts += [] if self.lanes is None else [self.lanes]
        if min(counts) < 1 or not min(self.deadline_s, self.max_model_mib, self.header_timeout_s, self.body_timeout_s) > 0:
            raise ServeError(
                "--max-length, --max-text, --max-concurrent, --deadline, --max-models, --max-model-mib, "
                "--max-connections, --header-timeout, --body-timeout, --max-batch, --queue, --threads and --lanes must be positive"
            )

    @property
    def max_body(self) -> int:
        """The most bytes a request body may have: what a text of `max_text` characters and
        the other fields can take as JSON, at the most bytes JSON spends on a character. A
        larger body is refused (413) from its Content-Length, or once that many bytes are read."""
        return JSON_BYTES_PER_CHARACTER * (self.max_text + OTHER_CHARACTERS) + BODY_SLACK


def require_extra() -> None:
    """ServeError with the pip command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError(EXTRA_HINT) from None


def open_server(
    runs_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits = Limits(),
    device: str = "cpu",
    precision: str = "fp32",
    allowed_hosts: Sequence[str] = (),
) -> Server:
    """A server bound to host:port (port 0: a free one), ready to `run`. It answers requests
    whose Host is an IP address, a loopback name, this machine's name, or one of `allowed_hosts`."""
    require_extra()
    from .server import Server

    return Server(runs_dir, host, port, limits, device, precision, allowed_hosts)
