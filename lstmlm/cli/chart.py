"""The terminal's perplexity chart (`lstmlm plot` without -o, and the end of `lstmlm train`):
braille characters give each terminal cell 2×4 dots, enough for a readable curve in a dozen
rows, with nothing beyond Rich. The points are the library's (`plot.points`)."""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from rich.text import Text

from ..plot import baseline_perplexities, points

if TYPE_CHECKING:
    from ..baselines import Baselines

TRAIN_STYLE, VAL_STYLE, BOTH_STYLE = "cyan", "magenta", "bold white"
BASELINE_STYLES = {"bigram": "green", "unigram": "yellow", "uniform": "dim"}

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
    train = points(records, "train_perplexity")
    val = points(records, "val_perplexity")
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
        at = [(x_of(e), y_of(v)) for e, v in zip(epochs, ys)]
        for (x0, y0), (x1, y1) in itertools.pairwise(at):
            canvas.line(x0, y0, x1, y1, name)
        for x, y in at[:1]:  # a lone epoch still shows
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
