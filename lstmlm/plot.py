"""Perplexity per epoch from runs' `metrics.jsonl`: the series to draw, and PNG or SVG files of
them; a run's baselines (`baselines.json`: uniform, unigram, bigram) as horizontal lines.

Files need matplotlib, an optional extra (`pip install 'lstmlm[plot]'`), imported only when a
file is asked for. The terminal's chart of the same points is the CLI's (`cli/chart.py`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import baselines as baselines_mod
from .atomic import check_output, write_output
from .baselines import Baselines
from .data.text import token_unit
from .errors import NothingToPlot, PlotError
from .figures import at_least
from .runs import RunStore

FORMATS = ("png", "svg")
BASELINE_DASHES = {"bigram": ":", "unigram": "-.", "uniform": (0, (6, 4))}  # matplotlib's


@dataclass(frozen=True)
class Series:
    """One line of a figure: a run's metric on one split, per epoch."""

    run: str
    metric: str  # "perplexity" or "bits per character"
    split: str  # "train" or "validation"
    epochs: list[float]  # an epoch's end (1, 2, ...), or a validation within one (1.25: a quarter into the second)
    values: list[float]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's records, in the order of their epochs (an epoch's, and a validation's within one);
    a run with neither a finished epoch nor a validation has nothing to plot."""
    store = RunStore.open(Path(run_dir))
    records = sorted((r for r in store.read_metrics() if at_least(r.get("epoch"), 0)), key=lambda r: r["epoch"])
    if not records:
        raise NothingToPlot(f"run {store.root} has no finished epoch or validation to plot yet")
    return records


def drawable(run_dirs: Sequence[Path]) -> dict[Path, list[dict[str, Any]]]:
    """The runs with something to plot, each with its records: a run just started beside others
    is left out rather than failing them all; if none has anything, the first one's error."""
    found: dict[Path, list[dict[str, Any]]] = {}
    first: NothingToPlot | None = None
    for d in map(Path, run_dirs):
        try:
            found[d] = read_metrics(d)
        except NothingToPlot as e:
            first = first or e
    if not found and first is not None:
        raise first
    return found


def baseline_perplexities(b: Baselines | None) -> list[tuple[str, float]]:
    """(name, perplexity = 2^bits) of each baseline, the best first; none without baselines."""
    if b is None:
        return []
    return [(name, 2.0 ** getattr(b, name)) for name in reversed(baselines_mod.NAMES)]


def points(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that have a perplexity `key` (validation may be off).
    An epoch's record carries the latest validation, made at its end or before it (a line of its
    own within the epoch, or an epoch earlier with --eval-every 2e): a validation figure the same
    as the point before it is that validation again, not one made at the epoch's end, and is
    drawn once."""
    kept: list[tuple[float, float]] = []
    for r in records:
        if not at_least(r.get(key), 1):
            continue
        value = float(r[key])
        if not (key == "val_perplexity" and type(r["epoch"]) is int and kept and kept[-1][1] == value):
            kept.append((r["epoch"], value))
    return [e for e, _ in kept], [v for _, v in kept]


def run_series(run: str, records: list[dict[str, Any]]) -> list[Series]:
    """Train and validation perplexity and bits per character (log2 of perplexity), where logged."""
    series = []
    for split, key in (("train", "train_perplexity"), ("validation", "val_perplexity")):
        epochs, values = points(records, key)
        if epochs:
            series.append(Series(run, "perplexity", split, epochs, values))
            series.append(Series(run, "bits per character", split, epochs, [math.log2(v) for v in values]))
    return series


# ---- files, with matplotlib ----------------------------------------------------------------------


def _figure_class() -> Any:
    try:
        # the object-oriented API alone: no pyplot, so no GUI backend and no global figure state
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("writing a plot file needs matplotlib: pip install 'lstmlm[plot]'") from None
    return Figure


def _plain_numbers() -> Any:
    """A tick formatter that writes 20, not 2×10¹ (a log axis's default)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:g}")


def bits_label(run_dirs: Sequence[Path]) -> str:
    """What the second chart's bits are per: a character, a byte where every run is a bytes
    model's, or either where bytes and character runs are drawn together."""
    units = {token_unit(RunStore.open(Path(d)).config.data.normalize) for d in run_dirs}
    return "bits per " + (units.pop() if len(units) == 1 else "character or byte")


def plot_runs(run_dirs: Sequence[Path], out_path: Path, force: bool = False) -> list[Series]:
    """Perplexity (log scale) and bits per character (per byte) per epoch for every run on one figure, with
    each run's baselines as horizontal lines in its colour, written to `out_path` (.png or .svg)
    by the rule of every command's output (atomic.write_output: an existing file replaced only
    with `force`, never one in a run's directory); a run with nothing yet beside others is left
    out (`drawable`). Returns the series drawn: in an SVG, series i is the group with id
    "lstmlm-series-i", and run r's baseline lines "lstmlm-baseline-r-NAME-perplexity" and
    "lstmlm-baseline-r-NAME-bits"."""
    out_path = Path(out_path)
    fmt = out_path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise PlotError(f"cannot write '{out_path.name}': the plot file must end in {' or '.join('.' + f for f in FORMATS)}")
    if not run_dirs:
        raise PlotError("no run to plot")
    check_output(out_path, force)  # refused before the drawing, not after
    records_of = drawable(run_dirs)
    run_dirs = list(records_of)
    series = [s for d, records in records_of.items() for s in run_series(d.name, records)]
    Figure = _figure_class()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = dict(zip(("perplexity", "bits per character"), fig.subplots(1, 2)))
    colours = {run: f"C{i % 10}" for i, run in enumerate(dict.fromkeys(s.run for s in series))}
    for i, s in enumerate(series):
        (line,) = axes[s.metric].plot(
            s.epochs,
            s.values,
            color=colours[s.run],
            linestyle="-" if s.split == "train" else "--",
            marker="o" if len(s.epochs) == 1 else None,
            label=f"{s.run} {s.split}",
        )
        line.set_gid(f"lstmlm-series-{i}")
    for r, d in enumerate(run_dirs):
        run, found = Path(d).name, baselines_mod.read(Path(d))
        for name, value in baseline_perplexities(found):
            for metric, shown, suffix in (("perplexity", value, "perplexity"), ("bits per character", getattr(found, name), "bits")):
                line = axes[metric].axhline(shown, color=colours[run], linestyle=BASELINE_DASHES[name], linewidth=1, alpha=0.8, label=f"{run} {name}")
                line.set_gid(f"lstmlm-baseline-{r}-{name}-{suffix}")
    axes["perplexity"].set_yscale("log")
    plain = _plain_numbers()
    axes["perplexity"].yaxis.set_major_formatter(plain)
    axes["perplexity"].yaxis.set_minor_formatter(plain)
    bits = bits_label(run_dirs)
    for metric, ax in axes.items():
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric if metric == "perplexity" else bits)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes["perplexity"].set_title("perplexity")
    axes["bits per character"].set_title(f"{bits} (log₂ perplexity)")
    with warnings.catch_warnings():  # a run named in a script the font lacks ("漢字") is drawn as boxes, not warned about on stderr with a line of this file
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        write_output(out_path, lambda f: fig.savefig(f, format=fmt), "plot", force)
    return series
