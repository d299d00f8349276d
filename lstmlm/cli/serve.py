"""`lstmlm serve`: the runs over HTTP, an API and a page (needs: pip install 'lstmlm[serve]')."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from ..serve import Limits
from . import options
from .console import err


@options.with_field_options(Limits)
def serve(
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback lets other machines in (see --token).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: a free one).")] = 8000,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A name the server answers for, in the Host header (repeatable); besides any IP address, localhost, this machine's name and --host.",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="LSTMLM_SERVE_TOKEN",
            show_envvar=True,
            help="Answer only requests that carry this token (Authorization: Bearer TOKEN; a browser opens the page once as /?token=TOKEN).",
        ),
    ] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="Serve HTTPS with this certificate (PEM; with --keyfile).")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="The certificate's private key (PEM, without a passphrase).")] = None,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
    **limits: Any,
) -> None:
    """Serve the runs: an HTTP API (generate as server-sent events or JSON, inspect, metrics) and a page at /.
    Needs: pip install 'lstmlm\\[serve]'."""
    from ..serve import open_server
    from ..serve.access import Access

    access = Access(token, certfile, keyfile)
    server = open_server(runs_dir, host, port, Limits(**limits), device, precision, allowed_host or (), access)
    if not server.loopback and token is None:
        warning = "anyone who can reach this machine can use the API (no authentication: see --token)"
    elif not server.loopback and not access.tls:
        warning = "over plain HTTP the token crosses the network in clear (--certfile and --keyfile serve HTTPS)"
    else:
        warning = ""
    with server.stoppable():  # Ctrl-C is the way a server is stopped, not an interruption; SIGTERM a service manager's way
        if warning:
            err.print(f"[yellow]warning:[/] serving on {escape(host)}: {warning}", soft_wrap=True)
        err.print(f"serving the runs in {escape(str(runs_dir))} at {server.url} (Ctrl-C stops)", soft_wrap=True, highlight=False)
        if token is not None:
            err.print(f"every request needs the token; a browser opens {server.url}?token=TOKEN once", soft_wrap=True, highlight=False)
        stopped_by = server.run()
        err.print("stopped")
    if stopped_by == signal.SIGTERM:
        raise typer.Exit(128 + signal.SIGTERM)
