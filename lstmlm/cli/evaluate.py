"""`lstmlm evaluate`: perplexity and bits per character (per byte) of a text under a trained model,
and beside it what the run's baselines (a uniform choice, its unigram and bigram models) score."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import corpus_progress, out, print_json, visible
from .shared import baselines_line


def evaluate(
    file: Annotated[str | None, typer.Argument(help="A text file (or directory, or glob) to score.")] = None,
    part: Annotated[str | None, typer.Option("--part", help="Score the run's own validation or test text instead: val or test.")] = None,
    run: options.Run = None,
    best: options.Best = False,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: options.Json = False,
) -> None:
    """Perplexity and bits per character (per byte for a bytes model) of a text under a trained model."""
    from ..inference import evaluate as score_text

    path = Path(file) if file else None  # '' names no file: as a Path it would be '.', this whole directory
    with corpus_progress() as progress:
        score = score_text(runs_dir, run, path, part, best, device, precision, progress)
    what = str(file) if file is not None else f"{part} text"
    if as_json:
        print_json({"file": str(file) if file is not None else None, "part": part, **dataclasses.asdict(score)})
        return
    unit = score.unit
    out.print(f"{escape(visible(what))}: perplexity {score.perplexity:.3f}, {score.bits_per_char:.3f} bits per {unit} "
              f"({score.predicted:,} {unit}s predicted, {score.unknown_characters:,} outside the vocabulary)", soft_wrap=True)  # fmt: skip
    if score.baselines is not None:
        out.print(baselines_line(score.baselines, unit, f"the same {unit}s", score.bits_per_char), soft_wrap=True, markup=False)
