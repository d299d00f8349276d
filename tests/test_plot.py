"""Perplexity plots: the terminal chart's shape, files from tiny trained runs parsed back, and
a clear message when matplotlib is missing."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import threading
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from lstmlm import plot
from lstmlm.cli.chart import perplexity_chart
from lstmlm.config import Config
from lstmlm.errors import PlotError
from lstmlm.runs import RunStore
from lstmlm.vocab import Vocab

from support.cli import assert_one_error_line, cli

SVG = "{http://www.w3.org/2000/svg}"


def records(epochs: int, with_val: bool = True) -> list[dict]:
    """metrics.jsonl lines of a run whose perplexity falls from ~20 towards 1.5."""
    return [
        {
            "epoch": e,
            "train_perplexity": 1.5 + 20 * math.exp(-e / 3),
            "val_perplexity": 2.0 + 20 * math.exp(-e / 3) if with_val else None,
            "val_bpc": math.log2(2.0 + 20 * math.exp(-e / 3)) if with_val else None,
        }
        for e in range(1, epochs + 1)
    ]


def fake_run(root: Path, name: str, lines: list[dict], normalize: str = "auto") -> Path:
    store = RunStore.create(root / name, Config().with_overrides({"normalize": normalize}), Vocab(["a", "b"]))
    for line in lines:
        store.append_metrics(line)
    return store.root


def render(renderable: object, width: int = 100) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


# ---- the terminal chart -----------------------------------------------------------------------


def test_chart_draws_falling_perplexity_from_top_left_to_bottom_right() -> None:
    lines = render(perplexity_chart(records(10), width=60, height=8))
    plot_rows = [line for line in lines if "┤" in line or "│" in line]
    assert len(plot_rows) == 8
    area = [re.split("[┤│]", row, maxsplit=1)[1] for row in plot_rows]
    assert all(len(row) == len(area[0]) for row in area)
    assert area[0][0] != " " and area[0].rstrip()[-1:] != area[0][-1:]  # epoch 1 at the top left
    assert area[-1][-1] != " " and area[-1][0] == " "  # the last epoch at the bottom right
    assert plot_rows[0].split("┤")[0].strip() == f"{records(10)[0]['val_perplexity']:.3g}"  # the highest value
    assert plot_rows[-1].split("┤")[0].strip() == f"{records(10)[-1]['train_perplexity']:.3g}"  # the lowest
    assert any("epoch 1" in line and line.rstrip().endswith("10") for line in lines)
    assert "━ train" in lines[-1] and "━ validation" in lines[-1]
    assert max(len(line) for line in lines) <= 60


def test_validations_within_a_first_epoch_not_yet_finished_are_the_chart(tmp_path: Path) -> None:
    """A corpus whose epoch outlasts the run: its validations' lines, at fractions of an epoch."""
    within = [{"epoch": f, "global_step": i, "train_perplexity": 30.0 - 10 * f, "val_perplexity": 31.0 - 10 * f} for i, f in enumerate((0.25, 0.5, 0.75), 1)]
    lines = render(perplexity_chart(plot.read_metrics(fake_run(tmp_path, "long", within)), width=60, height=6))
    assert any("epoch 0.25" in line and line.rstrip().endswith("0.75") for line in lines)
    assert "━ train" in lines[-1] and "━ validation" in lines[-1]


def test_chart_without_validation_has_one_series_and_a_single_epoch_still_shows() -> None:
    lines = render(perplexity_chart(records(1, with_val=False), width=40, height=4))
    assert "validation" not in lines[-1]
    assert sum(ch not in " ┤│" and 0x2800 <= ord(ch) <= 0x28FF for line in lines for ch in line) == 1
    assert render(perplexity_chart([], 40, 4)) == ["no epochs to plot yet"]


def test_series_hold_perplexity_and_bits_per_character_per_split() -> None:
    series = plot.run_series("r", records(3))
    assert [(s.metric, s.split) for s in series] == [
        ("perplexity", "train"),
        ("bits per character", "train"),
        ("perplexity", "validation"),
        ("bits per character", "validation"),
    ]
    assert series[0].epochs == [1, 2, 3]
    assert series[3].values == pytest.approx([r["val_bpc"] for r in records(3)])
    assert len(plot.run_series("r", records(3, with_val=False))) == 2


def test_a_validation_is_drawn_once_though_the_next_epochs_record_carries_it() -> None:
    """An epoch's record in metrics.jsonl carries the latest validation: one of --eval-every 2e
    made an epoch before, or one within the epoch (a line of its own, at its fraction)."""
    every_2e = records(4)
    every_2e[0].update(val_perplexity=None, val_bpc=None)
    every_2e[2].update(val_perplexity=every_2e[1]["val_perplexity"], val_bpc=every_2e[1]["val_bpc"])
    assert plot.points(every_2e, "val_perplexity")[0] == [2, 4]
    assert plot.points(every_2e, "train_perplexity")[0] == [1, 2, 3, 4]
    in_steps = [{"epoch": 0.5, "train_perplexity": 40.0, "val_perplexity": 30.0}, {"epoch": 1, "train_perplexity": 35.0, "val_perplexity": 30.0},
                {"epoch": 1.5, "train_perplexity": 28.0, "val_perplexity": 25.0}, {"epoch": 2, "train_perplexity": 27.0, "val_perplexity": 24.0}]  # fmt: skip
    assert plot.points(in_steps, "val_perplexity") == ([0.5, 1.5, 2], [30.0, 25.0, 24.0])
    assert [s.epochs for s in plot.run_series("r", in_steps) if s.split == "validation"] == [[0.5, 1.5, 2]] * 2


# ---- files from trained runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, int]]]:
    """Two tiny runs trained through the CLI: (runs dir, {run name: epochs})."""
    root = tmp_path_factory.mktemp("plot-runs")
    corpus_file = root / "corpus.txt"
    corpus_file.write_text("the quick brown fox jumps over the lazy dog.\n" * 30, encoding="utf-8")
    epochs = {"small": 2, "smaller": 3}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        for name, n in epochs.items():
            result = cli(
                "train", "--corpus", corpus_file, "--normalize", "raw", "--model", "cudnn", "--hidden", "16", "--epochs", str(n),
                "--batch-size", "8", "--num-steps", "16", "--optimizer", "adam", "--lr", "0.01", "--device", "cpu",
                "--run", name, "--runs-dir", root / "runs",
            )  # fmt: skip
            assert result.code == 0, result.stdout + result.stderr
    yield root / "runs", epochs


def path_points(d: str) -> int:
    """Vertices of an SVG path drawn by matplotlib: one per M or L command."""
    return len(re.findall(r"[ML]", d))


def test_svg_of_two_runs_has_every_series_with_one_point_per_epoch(trained_runs: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs_dir, epochs = trained_runs
    out = tmp_path / "ppl.svg"
    result = cli("plot", *epochs, "-o", str(out), "--runs-dir", str(runs_dir))
    assert result.code == 0, result.stdout + result.stderr
    assert "8 series from 2 run(s)" in result.stdout

    groups = {g.get("id"): g for g in ET.parse(out).getroot().iter(f"{SVG}g") if (g.get("id") or "").startswith("lstmlm-series-")}
    assert len(groups) == 8  # per run: train and validation, perplexity and bits per character
    series = plot.run_series("small", RunStore.open(runs_dir / "small").read_metrics()) + plot.run_series(
        "smaller", RunStore.open(runs_dir / "smaller").read_metrics()
    )
    for i, s in enumerate(series):
        (path,) = groups[f"lstmlm-series-{i}"].iter(f"{SVG}path")
        assert path_points(path.get("d")) == epochs[s.run], (i, s.run, s.metric, s.split)


def test_png_is_an_image(trained_runs: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs_dir, _ = trained_runs
    out = tmp_path / "ppl.png"
    series = plot.plot_runs([runs_dir / "small"], out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert [len(s.epochs) for s in series] == [2, 2, 2, 2]
    assert list(tmp_path.iterdir()) == [out]  # written atomically: no temporary file left


def test_a_bytes_runs_bits_are_per_byte_on_the_figure(tmp_path: Path) -> None:
    """The second chart said 'bits per character' for a bytes model, whose bits are per byte."""
    pytest.importorskip("matplotlib")
    chars, data = fake_run(tmp_path, "chars", records(3)), fake_run(tmp_path, "bytes", records(3), normalize="bytes")
    titles = {}
    for name, runs in (("bytes", [data]), ("chars", [chars]), ("both", [data, chars])):
        plot.plot_runs(runs, tmp_path / f"{name}.svg")
        titles[name] = re.findall(r"<!-- (bits per [^>]*) -->", (tmp_path / f"{name}.svg").read_text(encoding="utf-8"))
    assert titles == {
        "bytes": ["bits per byte", "bits per byte (log₂ perplexity)"],
        "chars": ["bits per character", "bits per character (log₂ perplexity)"],
        "both": ["bits per character or byte", "bits per character or byte (log₂ perplexity)"],
    }


def test_a_run_named_in_a_script_the_font_lacks_is_drawn_without_a_python_warning(tmp_path: Path) -> None:
    """matplotlib warned 'UserWarning: Glyph 28450 (...) missing from font(s) DejaVu Sans.' and
    the line of plot.py that saved the figure, on stderr, once for each such character."""
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path, "漢字", records(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot.plot_runs([run], tmp_path / "zh.png")
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []


def test_plot_output_follows_the_rule_of_every_commands_output(tmp_path: Path) -> None:
    """`plot -o` renamed its file over whatever was there: an existing chart without --force, a
    FIFO (made a regular file), a path in a run's directory; export -o and inspect --html refuse."""
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    fake_run(runs, "r", records(2))
    plot_r = ["plot", "r", "--runs-dir", str(runs)]
    mine = tmp_path / "mine.svg"
    mine.write_text("a chart I care about", encoding="utf-8")
    assert_one_error_line(cli(*plot_r, "-o", str(mine)), f"refusing to replace {mine}: it exists (--force replaces it)")
    assert mine.read_text(encoding="utf-8") == "a chart I care about"
    assert cli(*plot_r, "-o", str(mine), "--force").code == 0
    assert mine.read_text(encoding="utf-8").startswith("<?xml")
    inside = runs / "r" / "chart.png"
    assert_one_error_line(cli(*plot_r, "-o", str(inside), "--force"), f"refusing to write {inside}: {runs / 'r'} is a run's directory")
    assert not inside.exists()
    fifo = tmp_path / "chart.svg"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)  # waits for the writer
    reader.start()
    assert cli(*plot_r, "-o", str(fifo)).code == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and received[0].startswith(b"<?xml")  # written through, still a FIFO


def test_plot_without_output_draws_each_run_in_the_terminal(trained_runs: tuple[Path, dict[str, int]]) -> None:
    runs_dir, epochs = trained_runs
    result = cli("plot", *epochs, "--runs-dir", str(runs_dir))
    assert result.code == 0, result.stdout + result.stderr
    assert result.stdout.count("perplexity per epoch") == 2
    assert "small 2 epochs" in result.stdout and "smaller 3 epochs" in result.stdout


# ---- failures ---------------------------------------------------------------------------------------


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_run(tmp_path, "r", records(2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(PlotError, match=r"pip install 'lstmlm\[plot\]'"):
        plot.plot_runs([tmp_path / "r"], tmp_path / "out.png")
    result = cli("plot", "r", "-o", str(tmp_path / "out.svg"), "--runs-dir", str(tmp_path))
    assert result.code == 1
    assert "lstmlm[plot]" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.svg").exists()


def test_plot_refuses_unknown_formats_empty_runs_and_missing_runs(tmp_path: Path) -> None:
    fake_run(tmp_path, "r", records(2))
    fake_run(tmp_path, "empty", [])
    with pytest.raises(PlotError, match=r"\.png or \.svg"):
        plot.plot_runs([tmp_path / "r"], tmp_path / "out.pdf")
    with pytest.raises(PlotError, match="no finished epoch or validation"):
        plot.read_metrics(tmp_path / "empty")
    result = cli("plot", "nope", "--runs-dir", str(tmp_path))
    assert result.code == 1 and "no run at" in result.stderr


def test_a_run_with_nothing_yet_beside_others_is_left_out_and_named(tmp_path: Path) -> None:
    # `lstmlm plot done started` failed as a whole while `started` had no epoch yet
    fake_run(tmp_path, "done", records(2))
    fake_run(tmp_path, "started", [])
    series = plot.plot_runs([tmp_path / "started", tmp_path / "done"], tmp_path / "two.svg")
    assert {s.run for s in series} == {"done"} and (tmp_path / "two.svg").stat().st_size > 0
    drawn = cli("plot", "started", "done", "-o", str(tmp_path / "cli.svg"), "--runs-dir", str(tmp_path))
    assert drawn.code == 0 and "from 1 run(s)" in drawn.stdout
    assert drawn.stderr.strip() == "started: no finished epoch or validation to plot yet"
    charts = cli("plot", "started", "done", "--runs-dir", str(tmp_path))
    assert charts.code == 0 and charts.stdout.startswith("done 2 epochs") and "started" in charts.stderr
    assert_one_error_line(cli("plot", "started", "--runs-dir", str(tmp_path)), "has no finished epoch or validation to plot yet")
    with pytest.raises(PlotError, match="started has no finished epoch"):
        plot.plot_runs([tmp_path / "started", tmp_path / "started"], tmp_path / "none.svg")


def test_damaged_lines_are_left_out_and_the_rest_drawn(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "r", records(3))
    huge = "1" + "0" * 400  # JSON's digits spell an integer no float holds
    with (run / "metrics.jsonl").open("a") as f:
        for line in ("[1, 2]", "5", "[" * 100_000 + "]" * 100_000, '{"epoch": "4", "train_perplexity": 3}', '{"train_perplexity": 3}'):
            f.write(line + "\n")
        f.write(f'{{"epoch": 4, "train_perplexity": {huge}, "val_perplexity": 0.5}}\n')
        f.write(f'{{"epoch": 5, "train_perplexity": -1, "val_perplexity": {huge}}}\n')
    assert [r["epoch"] for r in plot.read_metrics(run)] == [1, 2, 3, 4, 5]
    assert [(s.split, s.epochs) for s in plot.run_series("r", plot.read_metrics(run)) if s.metric == "perplexity"] == [
        ("train", [1, 2, 3]),
        ("validation", [1, 2, 3]),
    ]
    for args in ([], ["-o", str(tmp_path / "out.svg")]):
        result = cli("plot", "r", "--runs-dir", str(tmp_path), *args)
        assert result.code == 0, result.stderr
