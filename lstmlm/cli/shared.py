"""What several commands render alike: a count and a duration to read at a glance, a two-column
table of settings, the line of a run's baselines."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from ..baselines import Baselines, Scored


def short_count(n: float) -> str:
    """1234 → '1.2k', 3_400_000 → '3.4M': a count to read at a glance."""
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}"


def clock(seconds: float) -> str:
    """A duration as 'h:mm:ss', to the whole second below."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def two_columns(rows: Sequence[tuple[str, str]], title: str | None = None) -> Table:
    """Key-value rows in two columns side by side (the first half left, the rest right), keys dim."""
    table = Table(title=title, show_header=False, box=None, padding=(0, 2))
    for style in ("dim", "", "dim", ""):
        table.add_column(style=style)
    half = (len(rows) + 1) // 2
    for left, right in itertools.zip_longest(rows[:half], rows[half:], fillvalue=("", "")):
        table.add_row(*left, *right)
    return table


def baselines_line(b: Baselines | Scored, unit: str, on: str, model: float | None) -> str:
    """'baselines on the validation text, bits per character: uniform 6.044 · unigram 4.829
    (Laplace add-one) · bigram 3.584 (interpolated Kneser–Ney, D 0.46) · the model 2.910'."""
    from ..baselines import BIGRAM, UNIGRAM  # numpy, which only a training needs

    figures = [f"uniform {b.uniform:.3f}", f"unigram {b.unigram:.3f} ({UNIGRAM})", f"bigram {b.bigram:.3f} ({BIGRAM}, D {b.discount:.2f})"]
    if model is not None:
        figures.append(f"the model {model:.3f}")
    return f"baselines on {on}, bits per {unit}: " + " · ".join(figures)
