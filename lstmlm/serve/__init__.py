"""`lstmlm serve`: trained runs over HTTP — an API and a page — on FastAPI and uvicorn.

    catalog.py      the runs a server offers, their figures, their models (a bounded cache)
    batching.py     continuous batching: a model's generations step together, one thread a batch
    bodies.py       the request bodies, a generation's options derived from generate.Sampling
    guards.py       what a request passes before any route: the Host check, the body's size limit
    access.py       a token every request carries (a header, or the page's cookie), and HTTPS
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

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..errors import ServeError
from ..fields import flag_of, option, wrong_type

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from .access import Access
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

    max_length: int = option(10_000, "Most characters one generation may ask for.", low=1)
    max_text: int = option(5_000, "Most characters of a prefix or of a text to inspect (and so of a body).", low=1)
    max_concurrent: int = option(8, "Inspections at once; more are refused (503).", low=1)
    deadline_s: float = option(60.0, "Seconds a generation may run; then it ends with what it made.", low=0.001, flag="--deadline")
    max_models: int = option(4, "Models kept loaded; the least recently used is let go first.", low=1)
    max_model_mib: float = option(1024.0, "MiB of weights kept loaded, all models together.", low=0.001)
    max_connections: int = option(256, "Open connections; one more is answered 503 and closed.", low=1)
    header_timeout_s: float = option(10.0, "Seconds a request's headers may take to arrive (then 408).", low=0.001, flag="--header-timeout")
    body_timeout_s: float = option(30.0, "Seconds a request's body may take after its headers (then 408).", low=0.001, flag="--body-timeout")
    max_batch: int = option(64, "Generations of one model stepping together; more wait in the queue.", low=1)
    queue: int = option(256, "Generations waiting for a place in a batch; more are refused (503, Retry-After).", low=1)
    threads: int = option(1, "Cores one batch's step uses (torch's intra-op threads in the server's process).", low=1)
    lanes: int | None = option(
        None, "Batches a model's generations are spread over, each in a thread of its own.", low=1, shown_default="one per core, one on a GPU"
    )

    def __post_init__(self) -> None:
        for f in fields(self):  # the command line's bounds are stricter (a float at least a thousandth)
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not value > 0:  # NaN too
                raise ServeError(f"{flag_of(f)} must be positive, not {value}")
            expected = wrong_type(f, value)  # a library caller's: refused by name, not a TypeError from the bound
            if expected:
                raise ServeError(f"{flag_of(f)} must be {expected}, not {value!r}")

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
    access: Access | None = None,
) -> Server:
    """A server bound to host:port (port 0: a free one), ready to `run`. It answers requests
    whose Host is an IP address, a loopback name, this machine's name, or one of `allowed_hosts`,
    and, where `access` has a token, that carry it; where it has a certificate, over HTTPS."""
    require_extra()
    from .access import Access
    from .server import Server

    return Server(runs_dir, host, port, limits, device, precision, allowed_hosts, access or Access())
