"""`lstmlm serve`: the runs over HTTP, an API and a page (needs: pip install 'lstmlm[serve]')."""

from __future__ import annotations

import signal
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from ..serve import Limits
from . import options
from .console import err
from .errors import Terminated


@options.with_field_options(Limits)
def serve(
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback lets other machines in (no authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: a free one).")] = 8000,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A name the server answers for, in the Host header (repeatable); besides any IP address, localhost, this machine's name and --host.",
        ),
    ] = None,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
    **limits: Any,
) -> None:
    """Serve the runs: an HTTP API (generate as server-sent events or JSON, inspect, metrics) and a page at /.
    Needs: pip install 'lstmlm\\[serve]'."""
    from ..serve import open_server

    server = open_server(runs_dir, host, port, Limits(**limits), device, precision, allowed_host or ())
    if not server.loopback:
        err.print(f"[yellow]warning:[/] serving on {escape(host)}: anyone who can reach this machine can use the API (no authentication)", soft_wrap=True)
    err.print(f"serving the runs in {escape(str(runs_dir))} at {server.url} (Ctrl-C stops)", soft_wrap=True, highlight=False)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn has shut down and passes Ctrl-C on: the way a server is stopped
        err.print("stopped")
    except Terminated:  # SIGTERM, passed on the same way: a service manager's way
        err.print("stopped")
        raise typer.Exit(128 + signal.SIGTERM) from None
