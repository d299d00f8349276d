"""`lstmlm serve`: the runs over HTTP, an API and a page (needs: pip install 'lstmlm[serve]')."""

from __future__ import annotations

import signal
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import err
from .errors import Terminated


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
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Most characters one generation may ask for.")] = 10_000,
    max_text: Annotated[int, typer.Option("--max-text", min=1, help="Most characters of a prefix or of a text to inspect (and so of a body).")] = 5_000,
    max_concurrent: Annotated[int, typer.Option("--max-concurrent", min=1, help="Inspections at once; more are refused (503).")] = 8,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Generations of one model stepping together; more wait in the queue.")] = 64,
    queue: Annotated[int, typer.Option("--queue", min=1, help="Generations waiting for a place in a batch; more are refused (503, Retry-After).")] = 256,
    deadline: Annotated[float, typer.Option("--deadline", min=0.001, help="Seconds a generation may run; then it ends with what it made.")] = 60.0,
    max_models: Annotated[int, typer.Option("--max-models", min=1, help="Models kept loaded; the least recently used is let go first.")] = 4,
    max_model_mib: Annotated[float, typer.Option("--max-model-mib", min=0.001, help="MiB of weights kept loaded, all models together.")] = 1024.0,
    max_connections: Annotated[int, typer.Option("--max-connections", min=1, help="Open connections; one more is answered 503 and closed.")] = 256,
    header_timeout: Annotated[float, typer.Option("--header-timeout", min=0.001, help="Seconds a request's headers may take to arrive (then 408).")] = 10.0,
    body_timeout: Annotated[float, typer.Option("--body-timeout", min=0.001, help="Seconds a request's body may take after its headers (then 408).")] = 30.0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="Cores one batch's step uses.")] = 1,
    lanes: Annotated[
        int | None,
        typer.Option(
            "--lanes", min=1, show_default="one per core, one on a GPU", help="Batches a model's generations are spread over, each in a thread of its own."
        ),
    ] = None,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
) -> None:
    """Serve the runs: an HTTP API (generate as server-sent events or JSON, inspect, metrics) and a page at /.
    Needs: pip install 'lstmlm\\[serve]'."""
    from ..serve import Limits, open_server

    limits = Limits(
        max_length, max_text, max_concurrent, deadline, max_models, max_model_mib, max_connections, header_timeout, body_timeout, max_batch, queue, threads,
        lanes,
    )  # fmt: skip
    server = open_server(runs_dir, host, port, limits, device, precision, allowed_host or ())
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
