"""Perplexity per epoch from runs' `metrics.jsonl`: a Rich chart for the terminal, PNG or SVG files;
a run's baselines (`baselines.json`: uniform, unigram, bigram) as horizontal lines on both.

The terminal chart needs nothing beyond Rich: braille characters give each terminal cell 2×4
dots, enough for a readable curve in a dozen rows. Files need matplotlib, an optional extra
(`pip install 'lstmlm[plot]'`), imported only when a file is asked for.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text

from . import baselines as baselines_mod
from .atomic import check_output, write_output
from .baselines import Baselines
from .errors import PlotError
from .figures import at_least
from .runs import RunStore

FORMATS = ("png", "svg")
TRAIN_STYLE, VAL_STYLE, BOTH_STYLE = "cyan", "magenta", "bold white"
BASELINE_STYLES = {"bigram": "green", "unigram": "yellow", "uniform": "dim"}  # the terminal's
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
        raise PlotError(f"run {store.root} has no finished epoch or validation to plot yet")
    return records


def baseline_perplexities(b: Baselines | None) -> list[tuple[str, float]]:
    """(name, perplexity = 2^bits) of each baseline, the best first; none without baselines."""
    if b is None:
        return []
    return [(name, 2.0 ** getattr(b, name)) for name in reversed(baselines_mod.NAMES)]


def _points(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records that have a perplexity `key` (validation may be off)."""
    kept = [(r["epoch"], float(r[key])) for r in records if at_least(r.get(key), 1)]
    return [e for e, _ in kept], [v for _, v in kept]


def run_series(run: str, records: list[dict[str, Any]]) -> list[Series]:
    """Train and validation perplexity and bits per character (log2 of perplexity), where logged."""
    series = []
    for split, key in (("train", "train_perplexity"), ("validation", "val_perplexity")):
        epochs, values = _points(records, key)
        if epochs:
            series.append(Series(run, "perplexity", split, epochs, values))
            series.append(Series(run, "bits per character", split, epochs, [math.log2(v) for v in values]))
    return series


# ---- the terminal chart -------------------------------------------------------------------------

# The bit of each dot in a braille cell (U+2800 + bits), by [row][column] of its 4×2 grid.
DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


class BrailleCanvas:
    """width × height terminal cells of 2 × 4 dots; each series keeps its own dots so a cell
    can be coloured by the series it shows."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.cells: list[list[dict[str, int]]] = [[{} for _ in range(width)] for _ in range(height)]

    def dot(self, x: int, y: int, series: str) -> None:
        """Set dot (x, y), x in [0, 2·width), y in [0, 4·height) counted from the top."""
        cell = self.cells[y // 4][x // 2]
        cell[series] = cell.get(series, 0) | DOTS[y % 4][x % 2]

    def line(self, x0: float, y0: float, x1: float, y1: float, series: str) -> None:
        steps = max(1, math.ceil(max(abs(x1 - x0), abs(y1 - y0))))
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), series)

    def rows(self, styles: dict[str, str]) -> list[Text]:
        lines = []
        for row in self.cells:
            line = Text()
            for cell in row:
                bits = 0
                for b in cell.values():
                    bits |= b
                style = styles[next(iter(cell))] if len(cell) == 1 else BOTH_STYLE if cell else ""
                line.append(chr(0x2800 + bits) if bits else " ", style)
            lines.append(line)
        return lines


def _label(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def perplexity_chart(records: list[dict[str, Any]], width: int = 72, height: int = 12, baselines: Baselines | None = None) -> Text:
    """Train and validation perplexity per epoch as a braille line chart (log scale), the
    run's baselines, if given, as dotted horizontal lines.

    `records` are metrics.jsonl lines (RunStore.read_metrics()); `width` is the chart's whole
    width in terminal cells, `height` the plot area's rows (3 at least; an axis, its labels and a legend
    add three). The log scale keeps the late, small improvements visible next to epoch 1.
    """
    train = _points(records, "train_perplexity")
    val = _points(records, "val_perplexity")
    lines = baseline_perplexities(baselines) if train[0] or val[0] else []
    values = train[1] + val[1] + [v for _, v in lines]
    if not values:
        return Text("no epochs to plot yet", style="dim")
    lo, hi = min(values), max(values)
    if hi / lo < 1.01:  # a flat curve: give it a band to sit in
        lo, hi = lo / 1.05, hi * 1.05
    first, last = min(train[0] + val[0]), max(train[0] + val[0])
    labels = [_label(hi), _label(math.sqrt(lo * hi)), _label(lo)]
    gutter = max(map(len, labels)) + 1
    plot_width, plot_height = max(4, width - gutter - 1), max(3, height)

    canvas = BrailleCanvas(plot_width, plot_height)
    dots_x, dots_y = 2 * plot_width - 1, 4 * plot_height - 1

    def x_of(epoch: float) -> float:
        return dots_x * (epoch - first) / (last - first) if last > first else dots_x / 2

    def y_of(value: float) -> float:  # 0 at the top
        return dots_y * (math.log(hi) - math.log(value)) / (math.log(hi) - math.log(lo))

    for name, (epochs, ys) in (("train", train), ("validation", val)):
        points = [(x_of(e), y_of(v)) for e, v in zip(epochs, ys)]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            canvas.line(x0, y0, x1, y1, name)
        for x, y in points[:1]:  # a lone epoch still shows
            canvas.dot(round(x), round(y), name)
    for name, value in lines:
        for x in range(0, dots_x + 1, 3):  # dotted
            canvas.dot(x, round(y_of(value)), name)

    styles = {"train": TRAIN_STYLE, "validation": VAL_STYLE, **BASELINE_STYLES}
    row_labels = {(plot_height - 1) // 2: labels[1], 0: labels[0], plot_height - 1: labels[2]}  # ends win
    chart = Text()
    chart.append("perplexity per epoch (log scale)\n", "bold")
    for r, row in enumerate(canvas.rows(styles)):
        chart.append(row_labels.get(r, "").rjust(gutter - 1) + " ┤" if r in row_labels else " " * gutter + "│", "dim")
        chart.append_text(row)
        chart.append("\n")
    chart.append(" " * gutter + "└" + "─" * plot_width + "\n", "dim")
    left, right = f"epoch {first:g}", f"{last:g}"
    chart.append(" " * (gutter + 1) + left + right.rjust(plot_width - len(left)) + "\n", "dim")
    chart.append(" " * (gutter + 1))
    chart.append("━ train", TRAIN_STYLE)
    if val[0]:
        chart.append("   ")
        chart.append("━ validation", VAL_STYLE)
    for name, value in lines:
        chart.append("   ")
        chart.append(f"┄ {name} {_label(value)}", BASELINE_STYLES[name])
    return chart


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


def plot_runs(run_dirs: Sequence[Path], out_path: Path, force: bool = False) -> list[Series]:
    """Perplexity (log scale) and bits per character per epoch for every run on one figure, with
    each run's baselines as horizontal lines in its colour, written to `out_path` (.png or .svg)
    by the rule of every command's output (atomic.write_output: an existing file replaced only
    with `force`, never one in a run's directory). Returns the series drawn: in an SVG, series i is the group with id
    "lstmlm-series-i", and run r's baseline lines "lstmlm-baseline-r-NAME-perplexity" and
    "lstmlm-baseline-r-NAME-bits"."""
    out_path = Path(out_path)
    fmt = out_path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise PlotError(f"cannot write '{out_path.name}': the plot file must end in {' or '.join('.' + f for f in FORMATS)}")
    if not run_dirs:
        raise PlotError("no run to plot")
    check_output(out_path, force)  # refused before the drawing, not after
    series = [s for d in run_dirs for s in run_series(Path(d).name, read_metrics(Path(d)))]
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
    for metric, ax in axes.items():
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes["perplexity"].set_title("perplexity")
    axes["bits per character"].set_title("bits per character (log₂ perplexity)")
    write_output(out_path, lambda f: fig.savefig(f, format=fmt), "plot", force)
    return series
