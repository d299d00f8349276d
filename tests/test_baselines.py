"""Baselines (lstmlm/baselines.py): counts and Kneser–Ney probabilities worked out by hand on a
tiny text, the bigram below the unigram on a real one, a bytes corpus and a one-symbol corpus,
what a run keeps, and where the figures appear: `lstmlm train` (a line, a JSON event),
`lstmlm evaluate`, `lstmlm plot` and the server's chart API."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lstmlm import baselines
from lstmlm.baselines import Counts, KneserNey
from lstmlm.cli.chart import perplexity_chart
from lstmlm.config import Config
from lstmlm.data.pipeline import prepare_data
from lstmlm.evaluation import layout

from support.cli import cli

# ---- by hand -------------------------------------------------------------------------------------

# V = 3; the text 0 1 0 1 2 0 has the pairs 01 10 01 12 20
TINY = np.array([0, 1, 0, 1, 2, 0], dtype=np.uint8)


def code(a: int, b: int, V: int = 3) -> int:
    return a * V + b


@pytest.mark.parametrize("how", ["dense", "dense, chunks of 2 on 2 threads", "sparse, chunks of 2"])
def test_counts_of_a_tiny_text_by_hand(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how.startswith("sparse"):
        monkeypatch.setattr(baselines, "DENSE_BINS", 1)  # np.unique per chunk, merged
    chunk = 2 if "chunks" in how else baselines.CHUNK
    counts = baselines.count(TINY, 3, chunk=chunk, workers=2)
    assert counts.unigrams.tolist() == [3, 2, 1]
    assert counts.pairs.tolist() == [code(0, 1), code(1, 0), code(1, 2), code(2, 0)]
    assert counts.pair_counts.tolist() == [2, 1, 1, 1]
    assert counts.tokens == 6


def test_kneser_ney_and_add_one_by_hand() -> None:
    counts = baselines.count(TINY, 3)
    # n1 = 3 pairs seen once (10, 12, 20), n2 = 1 seen twice (01): D = 3 / (3 + 2) = 0.6
    kn = KneserNey.of(counts)
    assert kn.discount == pytest.approx(0.6)
    # N1+(•b): 0 follows 1 and 2, 1 follows 0, 2 follows 1; N1+(••) = 4 pairs; 3 symbols continue something
    # P_kn(0) = (2 − .6)/4 + .6·3/4 · 1/3 = .35 + .15;  P_kn(1) = P_kn(2) = (1 − .6)/4 + .15
    assert kn.lower.tolist() == pytest.approx([0.5, 0.25, 0.25])
    a, b = np.array([0, 0, 0, 1, 1, 2]), np.array([1, 0, 2, 0, 2, 0])
    # after 0: c(0•) = 2, N1+(0•) = 1;  after 1: c(1•) = 2, N1+(1•) = 2;  after 2: c(2•) = 1, N1+(2•) = 1
    expected = [
        (2 - 0.6) / 2 + 0.6 * 1 / 2 * 0.25,  # P(1|0) = .775
        0.6 * 1 / 2 * 0.5,  # P(0|0) = .15: never seen, the lower order's share
        0.6 * 1 / 2 * 0.25,  # P(2|0) = .075
        (1 - 0.6) / 2 + 0.6 * 2 / 2 * 0.5,  # P(0|1) = .5
        (1 - 0.6) / 2 + 0.6 * 2 / 2 * 0.25,  # P(2|1) = .35
        (1 - 0.6) / 1 + 0.6 * 1 / 1 * 0.5,  # P(0|2) = .7
    ]
    assert kn.probability(a, b).tolist() == pytest.approx(expected)
    assert baselines.add_one(counts).tolist() == pytest.approx([4 / 9, 3 / 9, 2 / 9])  # (c + 1) / (6 + 3)

    # the text 0 1 2 0 read as one stream, as evaluate reads it: it predicts 1 after 0, 2 after 1, 0 after 2
    scored = baselines.score(counts, np.array([0, 1, 2, 0]), *layout(4, batch_size=1, num_steps=3))
    assert scored.predicted == 3
    assert scored.bigram == pytest.approx(-(math.log2(0.775) + math.log2(0.35) + math.log2(0.7)) / 3)
    assert scored.unigram == pytest.approx(-(math.log2(3 / 9) + math.log2(2 / 9) + math.log2(4 / 9)) / 3)
    assert scored.uniform == pytest.approx(math.log2(3))


def test_every_context_is_a_distribution_even_unseen_ones() -> None:
    rng = np.random.default_rng(0)
    V = 12  # symbols 10 and 11 never occur: as <unk> and a validation-only character
    counts = baselines.count(rng.integers(0, 10, size=5_000), V)
    kn = KneserNey.of(counts)
    a, b = np.repeat(np.arange(V), V), np.tile(np.arange(V), V)
    p = kn.probability(a, b).reshape(V, V)
    assert (p > 0).all()
    assert p.sum(axis=1) == pytest.approx(np.ones(V))
    assert baselines.add_one(counts).sum() == pytest.approx(1.0)


# ---- real corpora ----------------------------------------------------------------------------------


def corpus_data(path: Path, normalize: str = "raw", **overrides: Any) -> Any:
    cfg = Config().with_overrides({"corpus": str(path), "normalize": normalize, "batch_size": 4, "num_steps": 8, **overrides}).resolved()
    return prepare_data(cfg)


def run_baselines(tmp_path: Path, data: Any, unit: str = "character", val_tokens: int = 0) -> baselines.Baselines:
    return baselines.for_training(tmp_path, data.train, data.val, len(data.vocab), unit, 32, 35, val_tokens)


def test_on_the_time_machine_the_bigram_beats_the_unigram_which_beats_a_uniform_choice(data_dir: Path, tmp_path: Path) -> None:
    data = corpus_data(data_dir / "timemachine.txt")
    b = run_baselines(tmp_path, data)
    assert b.text == "validation" and b.counted == len(data.train) and b.vocab_size == len(data.vocab)
    assert b.bigram < b.unigram < b.uniform == pytest.approx(math.log2(len(data.vocab)))
    assert 2.5 < b.bigram < 3.8 and 4.0 < b.unigram < 4.8  # a character bigram of English, a unigram's ~4.1-4.5 bits
    assert b.predicted == layout(len(data.val), 32, 35)[0] * layout(len(data.val), 32, 35)[2]


def test_a_bytes_corpus_has_256_symbols(tmp_path: Path) -> None:
    corpus = tmp_path / "bytes.txt"
    corpus.write_text("naïve café — ἀρχή 日本語のテキスト\n" * 200, encoding="utf-8")
    data = corpus_data(corpus, "bytes")
    assert len(data.vocab) == 256
    b = run_baselines(tmp_path, data, "byte")
    assert b.uniform == 8.0 and b.unit == "byte"
    assert 0 < b.bigram < b.unigram < 8.0
    assert all(math.isfinite(v) for v in (b.bigram, b.unigram))


def test_a_one_symbol_corpus_divides_by_nothing_and_scores_almost_nothing(tmp_path: Path) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("a" * 1000, encoding="utf-8")
    data = corpus_data(corpus)
    assert len(data.vocab) == 2  # <unk> and a
    with np.errstate(all="raise"):  # no division by zero, no log of zero, anywhere
        b = run_baselines(tmp_path, data)
    N = len(data.train)
    assert b.uniform == 1.0
    assert b.unigram == pytest.approx(-math.log2((N + 1) / (N + 2)))  # add-one keeps a share for <unk>
    assert 0 < b.bigram < b.unigram  # 'a' after 'a' (N − 1 times) is all but certain
    assert b.discount == 0.75  # no pair seen once or twice: Ney's estimate has nothing to go on


def test_a_text_of_one_token_has_no_pairs(tmp_path: Path) -> None:
    counts = baselines.count(np.array([1], dtype=np.uint8), 4)
    assert counts.unigrams.tolist() == [0, 1, 0, 0] and len(counts.pairs) == 0
    kn = KneserNey.of(counts)
    assert kn.probability(np.array([1, 0]), np.array([1, 3])).tolist() == [0.25, 0.25]  # uniform, for lack of pairs


# ---- what a run keeps ------------------------------------------------------------------------------


def test_a_run_keeps_its_baselines_and_counts_and_reuses_them(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = corpus_data(data_dir / "timemachine.txt")
    first = run_baselines(tmp_path, data, val_tokens=2_000)
    assert json.loads((tmp_path / baselines.FIGURES).read_text())["bigram"] == first.bigram
    assert baselines.read(tmp_path) == first
    counts = baselines.load_counts(tmp_path)
    assert counts is not None and counts.tokens == len(data.train)
    assert counts.unigrams.tolist() == np.bincount(data.train.numpy(), minlength=len(data.vocab)).tolist()

    def no_counting(*_: Any, **__: Any) -> Counts:
        raise AssertionError("counted again")

    monkeypatch.setattr(baselines, "count", no_counting)
    assert run_baselines(tmp_path, data, val_tokens=2_000) == first  # a resume reads them
    other = run_baselines(tmp_path, data, val_tokens=0)  # a resume that validates on all of it: scored again, from counts.npz
    assert other.val_tokens == 0 and other.predicted > first.predicted and other.counted == first.counted
    assert baselines.read(tmp_path) == other


def test_missing_or_damaged_files_read_as_none(tmp_path: Path) -> None:
    assert baselines.read(tmp_path) is None and baselines.load_counts(tmp_path) is None  # a run made before lstmlm kept them
    (tmp_path / baselines.FIGURES).write_text('{"format": 1, "bigram": "x"}')
    (tmp_path / baselines.COUNTS).write_bytes(b"PK\x03\x04 not a zip")
    assert baselines.read(tmp_path) is None and baselines.load_counts(tmp_path) is None
    (tmp_path / baselines.FIGURES).write_text("{not json")
    assert baselines.read(tmp_path) is None


def test_counts_that_would_inflate_past_what_they_can_hold_are_not_read(tmp_path: Path) -> None:
    """A counts.npz of 256 KiB whose entry inflates to 256 MiB (a zip bomb in a run's directory):
    read whole by numpy, it took the memory `lstmlm evaluate` had (6 GiB from 6 MB: 'out of
    memory', the command failed). It now reads as none, before anything is inflated."""
    import io
    import tracemalloc
    import zipfile

    with zipfile.ZipFile(tmp_path / baselines.COUNTS, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        scalar = io.BytesIO()
        np.lib.format.write_array(scalar, np.array(3))
        z.writestr("vocab_size.npy", scalar.getvalue())
        with z.open("unigrams.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": ((256 << 20) // 8,)})
            for _ in range(64):
                f.write(bytes(4 << 20))
    assert (tmp_path / baselines.COUNTS).stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        assert baselines.load_counts(tmp_path) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("bigram", ["NaN", "Infinity", "-5", "1e5", "1" + "0" * 400])
def test_figures_no_scoring_gives_read_as_none_and_plot_draws_the_run_without_them(
    trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path, bigram: str
) -> None:
    import shutil

    runs = Path(shutil.copytree(trained[0], tmp_path / "runs"))
    path = runs / "r" / baselines.FIGURES
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record).replace(json.dumps(record["bigram"]), bigram))
    assert baselines.read(runs / "r") is None
    shown = cli("plot", "r", "--runs-dir", runs)
    assert shown.code == 0 and "bigram" not in shown.stdout, shown.stderr


# ---- where they appear -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A tiny run trained through the CLI with --json: (runs dir, its JSON lines)."""
    from support.tiny import synthetic_text

    root = tmp_path_factory.mktemp("baseline-runs")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        result = cli(
            "train", "--corpus", corpus, "--normalize", "raw", "--runs-dir", root / "runs", "--run", "r", "--hidden", "16",
            "--batch-size", "8", "--num-steps", "10", "--epochs", "2", "--device", "cpu", "--json",
        )  # fmt: skip
    assert result.code == 0, result.stderr
    return root / "runs", result.json()


def test_train_reports_them_first_as_json_and_keeps_them(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    runs, lines = trained
    lines = [line for line in lines if line["event"] != "note"]  # what the run chose, said before it starts
    assert lines[0]["event"] == "baselines"
    kept = baselines.read(runs / "r")
    assert kept is not None and {k: v for k, v in lines[0].items() if k != "event"} == json.loads(json.dumps(kept.__dict__))
    assert lines[0]["unigram_smoothing"] == "Laplace add-one" and lines[0]["bigram_smoothing"] == "interpolated Kneser–Ney"
    assert kept.text == "validation" and kept.bigram < kept.unigram < kept.uniform


def test_train_prints_them_in_one_line_under_the_first_validation(corpus_file: Path, runs_dir: Path) -> None:
    result = cli(*["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, "--run", "h"],
                 *["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--epochs", "1", "--device", "cpu"])  # fmt: skip
    assert result.code == 0, result.stderr
    text = result.stdout + result.stderr
    (line,) = [ln for ln in text.splitlines() if ln.startswith("baselines on")]
    b = baselines.read(runs_dir / "h")
    assert b is not None
    first_val = math.log2(json.loads((runs_dir / "h" / "metrics.jsonl").read_text().splitlines()[0])["val_perplexity"])
    assert line == (
        f"baselines on the validation text, bits per character: uniform {b.uniform:.3f} · unigram {b.unigram:.3f} (Laplace add-one) · "
        f"bigram {b.bigram:.3f} (interpolated Kneser–Ney, D {b.discount:.2f}) · the model {first_val:.3f}"
    )


def test_evaluate_puts_the_models_figure_beside_them_on_the_same_characters(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    runs, _ = trained
    result = cli("evaluate", "--part", "val", "--run", "r", "--runs-dir", runs, "--json")
    assert result.code == 0, result.stderr
    (score,) = result.json()
    kept = baselines.read(runs / "r")
    assert kept is not None and kept.val_tokens >= kept.predicted  # training scored the whole validation text, as evaluate does
    assert score["baselines"]["predicted"] == score["predicted"] == kept.predicted
    assert (score["baselines"]["unigram"], score["baselines"]["bigram"]) == pytest.approx((kept.unigram, kept.bigram))
    text = cli("evaluate", "--part", "val", "--run", "r", "--runs-dir", runs)
    assert f"baselines on the same characters, bits per character: uniform {kept.uniform:.3f}" in text.stdout
    assert f"the model {score['bits_per_char']:.3f}" in text.stdout


def test_plot_draws_them_as_horizontal_lines(trained: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    runs, _ = trained
    kept = baselines.read(runs / "r")
    assert kept is not None
    result = cli("plot", "r", "--runs-dir", runs)
    assert result.code == 0 and f"┄ bigram {2**kept.bigram:.3g}" in result.stdout and f"┄ uniform {2**kept.uniform:.3g}" in result.stdout
    metrics = [json.loads(line) for line in (runs / "r" / "metrics.jsonl").read_text().splitlines()]
    chart = perplexity_chart(metrics, 60, 8, kept)
    assert sum(ch == "┄" for ch in chart.plain) == 3

    pytest.importorskip("matplotlib")
    out = tmp_path / "r.svg"
    assert cli("plot", "r", "--runs-dir", runs, "-o", out).code == 0
    ids = {g.get("id") for g in ET.parse(out).getroot().iter("{http://www.w3.org/2000/svg}g")}
    assert {f"lstmlm-baseline-0-{n}-{m}" for n in ("uniform", "unigram", "bigram") for m in ("perplexity", "bits")} <= ids


def test_the_servers_chart_api_gives_them(trained: tuple[Path, list[dict[str, Any]]]) -> None:
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
    from fastapi.testclient import TestClient

    from lstmlm.serve import Limits
    from lstmlm.serve.app import create_app

    runs, _ = trained
    body = TestClient(create_app(runs, Limits())).get("/api/runs/r/metrics").json()
    kept = baselines.read(runs / "r")
    assert kept is not None and body["baselines"]["bigram"] == kept.bigram and len(body["epochs"]) == 2
