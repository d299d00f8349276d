"""`lstmlm serve`: trained runs over HTTP — an API and a page — on FastAPI and uvicorn.

    catalog.py   the runs a server offers, their figures, their models (loaded once, reused)
    app.py       the routes: /api/runs, /api/generate (server-sent events or JSON),
                 /api/inspect, /api/runs/{name}/metrics, /api/status, and the page at /
    server.py    a socket bound here and uvicorn serving the app on it
    static/      the page: HTML, one script, one style sheet (no build step, no network)

FastAPI and uvicorn are an optional extra (`pip install 'lstmlm[serve]'`); without them the
command says so in one line. The bounds every request lives within are `Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ServeError

if TYPE_CHECKING:
    from pathlib import Path

    from .server import Server

EXTRA_HINT = "lstmlm serve needs FastAPI and uvicorn: pip install 'lstmlm[serve]'"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how much runs at once."""

    max_length: int = 10_000  # characters a generation may ask for
    max_text: int = 5_000  # characters of a prefix or of a text to inspect
    max_concurrent: int = 8  # generations and inspections running at once; more are refused (503)
    deadline_s: float = 60.0  # a generation ends here, with what it has made ("deadline")

    def __post_init__(self) -> None:
        if self.max_length < 1 or self.max_text < 1 or self.max_concurrent < 1 or not self.deadline_s > 0:
            raise ServeError("--max-length, --max-text, --max-concurrent and --deadline must be positive")


def require_extra() -> None:
    """ServeError with the pip command when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ServeError(EXTRA_HINT) from None


def open_server(
    runs_dir: Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(), device: str = "cpu", precision: str = "fp32"
) -> Server:
    """A server bound to host:port (port 0: a free one), ready to `run`."""
    require_extra()
    from .server import Server

    return Server(runs_dir, host, port, limits, device, precision)
