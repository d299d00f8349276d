"""`lstmlm plot`: perplexity per epoch of one or several runs, in the terminal or as a PNG/SVG file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR, check_run_name
from . import options
from .console import err, out, visible


def plot_(
    runs: Annotated[list[str], typer.Argument(help="Run names under --runs-dir; several share one figure.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write FILE.png or FILE.svg (needs: pip install 'lstmlm\\[plot]'); default: a chart per run here."),
    ] = None,
    force: options.Force = False,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
) -> None:
    """Train and validation perplexity per epoch (and bits per character in files), from the runs' metrics; their baselines as lines."""
    from .. import baselines, plot  # numpy's: the command line starts without it
    from .chart import perplexity_chart

    dirs = [runs_dir / check_run_name(name) for name in runs]
    if output is not None:
        series = plot.plot_runs(dirs, output, force)
        drawn = {s.run for s in series}
        for d in dirs:
            if d.name not in drawn:
                say_nothing_yet(d)
        out.print(f"wrote {escape(visible(str(output)))}: {len(series)} series from {len(drawn)} run(s)", soft_wrap=True)
        return
    found = plot.drawable(dirs)
    for d in dirs:
        if d not in found:
            say_nothing_yet(d)
            continue
        records = found[d]
        out.print(f"[bold]{escape(visible(d.name))}[/] [dim]{len(records)} epochs[/]")
        out.print(perplexity_chart(records, width=min(out.width, 100), height=12, baselines=baselines.read(d)))


def say_nothing_yet(run: Path) -> None:
    """The line for a run left out: nothing to draw yet, beside runs that have something."""
    err.print(f"[dim]{escape(visible(run.name))}: no finished epoch or validation to plot yet[/]", soft_wrap=True)
