"""`lstmlm export`: a trained model as one step (ids, state → logits, state) for ONNX or TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import out


def export(
    run: options.Run = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="onnx (needs: pip install 'lstmlm\\[export]') or torchscript; default: as -o's suffix says (.onnx, .pt), else onnx."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="The file to write (default: RUN.onnx or RUN.pt here).")] = None,
    best: options.Best = False,
    force: options.Force = False,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
) -> None:
    """Export a trained model as one step, ids and state in, logits and state out, for a runtime without lstmlm."""
    from ..inference import export_run

    done = export_run(runs_dir, run, format, output, best, force)
    out.print(f"wrote {escape(str(done.path))} ({done.format}, {done.bytes:,} bytes); its logits match lstmlm's over "
              f"{done.checked_steps} steps within {done.max_difference:.1e}", soft_wrap=True)  # fmt: skip
