"""The Typer application: the root options and the commands, each from its own module."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from types import FrameType
from typing import Annotated, NoReturn

import typer

from .bench import bench
from .console import out
from .download import download
from .errors import Began, friendly
from .evaluate import evaluate
from .export import export
from .generate import generate
from .inspect_units import inspect_
from .plot import plot_
from .runs import app as runs_app
from .serve import serve
from .train import train
from .tune import tune

app = typer.Typer(
    name="lstmlm",
    help="Train character-level language models: the d2l LSTM (GRU, RNN) from scratch and on cuDNN.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for name, command, torch in (  # torch: whether the command loads it (download, plot and runs start without it)
    ("download", download, False),
    ("train", train, True),
    ("tune", tune, True),
    ("generate", generate, True),
    ("evaluate", evaluate, True),
    ("bench", bench, True),
    ("plot", plot_, False),
    ("inspect", inspect_, True),
    ("serve", serve, True),
    ("export", export, True),
):
    app.command(name)(friendly(command, torch))
app.add_typer(runs_app, name="runs")  # a group: the list, `show` and `rm`


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"lstmlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Train character-level language models: the d2l LSTM (GRU, RNN) from scratch and on cuDNN."""


def main() -> None:
    """The command, then the process's end right after its output is flushed and its exit
    handlers have run, without the interpreter's teardown: with torch loaded it takes a second
    or more, with SIGINT and SIGTERM back at their defaults (a Ctrl-C then killed the process
    without a line), and under torchrun a group's threads that torch never let go of can abort
    a finished training there (lstmlm/distributed.py, `stop`)."""
    try:
        run_app()
    except SystemExit as e:
        signals_end_now(e.code)
        end_now(e.code)


def run_app() -> None:
    """The application, with a Ctrl-C before any command's handler runs one line, as later:
    while Typer builds the command line from the commands' signatures (it raises), or parses
    the arguments (it exits 130 without a word), a third of a second in all."""
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    except SystemExit as e:
        if e.code == 130 and not Began.command:
            sys.stderr.write("error: interrupted\n")
        raise


def signals_end_now(code: int | str | None) -> None:
    """The command has ended: a Ctrl-C or SIGTERM while its exit handlers run has nothing left to
    stop (raised there, Ctrl-C printed a traceback from the handler, and SIGTERM killed the
    process), and ends the process at once, with the command's code."""

    def now(_signum: int, _frame: FrameType | None) -> NoReturn:
        with contextlib.suppress(Exception):  # a closed pipe: the code is all there is left to give
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)

    with contextlib.suppress(ValueError):  # not the main thread (a test's runner): as they were
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, now)


def end_now(code: int | str | None) -> NoReturn:
    """Exit with `code` as SystemExit would, after flushing the output and running the exit
    handlers, but without tearing the interpreter down."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code or 0)
