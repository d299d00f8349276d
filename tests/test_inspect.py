"""Inspecting a model: the gates equal the model's own forward, a trained quote cell is found,
saturation counts, and the HTML page holds the whole text and every unit's values in range."""

from __future__ import annotations

import base64
import html.parser
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lstmlm import cells, units, units_page
from lstmlm.data.text import MAX_TEXT_BYTES
from lstmlm.errors import InspectError
from lstmlm.inference import load as load_trained
from lstmlm.model import CharLM
from lstmlm.vocab import Vocab

from support.cli import cli, lstmlm_process

QUOTE = r'"[^"]*"'


def quoted_corpus(sentences: int, seed: int = 0) -> str:
    """Sentences of words over a–m with one quoted span of words over n–z each: being inside
    the quotes decides which letters come next, so a trained model has reason to keep track."""
    rng = random.Random(seed)

    def word(letters: str) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(2, 5)))

    lines = []
    for _ in range(sentences):
        words = [word("abcdefghijklm") for _ in range(rng.randint(2, 5))]
        quote = " ".join(word("nopqrstuvwxyz") for _ in range(rng.randint(2, 6)))
        words.insert(rng.randint(0, len(words)), f'"{quote}"')
        lines.append(" ".join(words) + ".\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def quote_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A tiny model trained on the quoted corpus: (runs dir, run name)."""
    root = tmp_path_factory.mktemp("quote-run")
    corpus_file = root / "quotes.txt"
    corpus_file.write_text(quoted_corpus(150), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        result = cli(
            "train", "--corpus", corpus_file, "--normalize", "raw", "--model", "cudnn", "--hidden", "16", "--epochs", "4",
            "--batch-size", "8", "--num-steps", "32", "--optimizer", "adam", "--lr", "0.03", "--device", "cpu",
            "--run", "quotes", "--runs-dir", root / "runs",
        )  # fmt: skip
    assert result.code == 0, result.stdout + result.stderr
    yield root / "runs", "quotes"


def randomized(model: CharLM, seed: int = 0) -> CharLM:
    """Weights large enough that every gate swings (the seed's N(0, 0.01²) keeps them near 0.5)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


TEXT = 'He said "no" & left.\n<b>{{text}}</b>'


# ---- activations equal the model's forward --------------------------------------------------


@pytest.mark.parametrize("core, embedding", [("scratch", 0), ("cudnn", 0), ("scratch", 6)])
def test_activations_match_the_models_forward(core: str, embedding: int) -> None:
    vocab = Vocab.build(TEXT)
    model = randomized(CharLM(len(vocab), 12, num_layers=2, core=core, embedding=embedding))
    layers = units.activations(model, vocab, TEXT)

    ids = vocab.encode(TEXT).long()[None]  # (batch 1, steps)
    X = ids.T if model.embedding is None else model.embedding(ids.T)
    with torch.no_grad():
        outputs, (H, C) = model.core(X)  # outputs: (steps, 1, hiddens), the last layer's H_t
    assert len(layers) == 2
    assert torch.allclose(layers[-1].H, outputs[:, 0], atol=1e-5)
    for k, layer in enumerate(layers):
        assert layer.H.shape == (len(TEXT), 12)
        assert torch.allclose(layer.H[-1], H[k, 0], atol=1e-5)
        assert torch.allclose(layer.gate("cell")[-1], C[k, 0], atol=1e-5)


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_a_grus_activations_are_its_own_gates_and_match_its_forward(core: str) -> None:
    vocab = Vocab.build(TEXT)
    model = randomized(CharLM(len(vocab), 12, num_layers=2, core=core, cell="gru"))
    layers = units.activations(model, vocab, TEXT)
    assert set(layers[0].values) == {"R", "Z", "H_tilde", "H"}
    ids = vocab.encode(TEXT).long()[None]
    with torch.no_grad():
        outputs, (H,) = model.core(ids.T)
    assert torch.allclose(layers[-1].H, outputs[:, 0], atol=1e-5) and torch.allclose(layers[-1].H[-1], H[-1, 0], atol=1e-5)
    layer = layers[0]
    H_prev = torch.cat([torch.zeros(1, 12), layer.H[:-1]])
    Z, H_tilde = layer.gate("update"), layer.gate("candidate")
    assert torch.allclose(layer.H, Z * H_prev + (1 - Z) * H_tilde, atol=1e-6)  # H_t = Z ⊙ H_{t-1} + (1 - Z) ⊙ H̃
    for name in ("reset", "update"):
        assert 0 <= layer.gate(name).min() and layer.gate(name).max() <= 1
    with pytest.raises(InspectError, match="the GRU has no gate 'forget' \\(choose from reset, update, candidate, hidden\\)"):
        layer.gate("forget")


def test_gates_lie_in_their_ranges_and_compose_as_the_equations() -> None:
    vocab = Vocab.build(TEXT)
    layer = units.activations(randomized(CharLM(len(vocab), 8)), vocab, TEXT)[0]
    for gate in layer.cell.gates:
        if gate.low is not None:
            assert gate.low <= layer.gate(gate.name).min() and layer.gate(gate.name).max() <= gate.high
    I, F, O, C_tilde, C, H = (layer.values[k] for k in ("I", "F", "O", "C_tilde", "C", "H"))
    C_prev = torch.cat([torch.zeros(1, 8), C[:-1]])
    assert torch.allclose(C, F * C_prev + I * C_tilde, atol=1e-6)
    assert torch.allclose(H, O * torch.tanh(C), atol=1e-6)


def test_unknown_characters_read_as_unk_and_empty_text_is_refused() -> None:
    vocab = Vocab.build("abc")
    model = randomized(CharLM(len(vocab), 4))
    with_unknown = units.activations(model, vocab, "a€c")
    as_unk = units.activations(model, vocab, "a<c")  # '<' is outside the vocabulary too
    assert torch.equal(with_unknown[0].gate("cell"), as_unk[0].gate("cell"))
    with pytest.raises(InspectError, match="empty"):
        units.activations(model, vocab, "")


@pytest.mark.parametrize("top", [0, -1])
def test_a_top_below_one_is_refused_by_name(top: int) -> None:
    """The command line bounds --top; a library caller's -1 was a RuntimeError from torch.topk
    (and with `find`, every ranked unit but the last, silently)."""
    vocab = Vocab.build("abc")
    model = randomized(CharLM(len(vocab), 4))
    for find in (None, "b"):
        with pytest.raises(InspectError, match=f"top must be at least 1, not {top}"):
            units.inspect_text(model, vocab, "raw", "abcab", top=top, find=find)


# ---- finding units ------------------------------------------------------------------------------


def test_span_feature_marks_the_matched_characters() -> None:
    assert units.span_feature('ab "cd" e "f"', QUOTE).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    with pytest.raises(InspectError, match="invalid regular expression"):
        units.span_feature("abc", "(")
    with pytest.raises(InspectError, match="matches nothing"):
        units.span_feature("abc", "x")
    with pytest.raises(InspectError, match="whole text"):
        units.span_feature("abc", ".+")


def test_pearson_matches_numpy_and_is_zero_for_a_constant_unit() -> None:
    torch.manual_seed(0)
    A = torch.randn(50, 3)
    A[:, 2] = 0.7  # a unit that never moves
    y = (torch.rand(50) > 0.5).double()
    r = units.pearson(A, y)
    for k in range(2):
        expected = torch.corrcoef(torch.stack([A[:, k].double(), y]))[0, 1]
        assert r[k].item() == pytest.approx(expected.item(), abs=1e-12)
    assert r[2].item() == 0.0


def test_find_units_ranks_a_trained_quote_cell_first(quote_run: tuple[Path, str]) -> None:
    runs_dir, run = quote_run
    trained = load_trained(runs_dir, run)
    model, vocab = trained.model, trained.vocab
    text = quoted_corpus(20, seed=1)  # sentences the model never saw
    ranking = units.find_units(units.activations(model, vocab, text), text, QUOTE)

    assert len(ranking) == 16 and [abs(s.correlation) for s in ranking] == sorted((abs(s.correlation) for s in ranking), reverse=True)
    best = abs(ranking[0].correlation)
    random_unit = random.Random(0).choice(ranking[1:])
    assert best > 0.8
    assert best > abs(random_unit.correlation) + 0.2
    # the quote cell is learned: an untrained model of the same shape has none as good
    torch.manual_seed(0)
    untrained = CharLM(len(vocab), 16, core="cudnn").eval()
    assert best > abs(units.find_units(units.activations(untrained, vocab, text), text, QUOTE)[0].correlation) + 0.2


def test_inspect_find_lists_the_best_unit_first(quote_run: tuple[Path, str]) -> None:
    runs_dir, run = quote_run
    text = quoted_corpus(20, seed=1)
    result = cli("inspect", "--run", run, "--runs-dir", str(runs_dir), "--text", text, "--find", QUOTE, "--top", "2")
    assert result.code == 0, result.stdout + result.stderr

    trained = load_trained(runs_dir, run)
    model, vocab = trained.model, trained.vocab
    best = units.find_units(units.activations(model, vocab, text), text, QUOTE)[0]
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*([+-]\d\.\d{3})\s*│", result.stdout)
    assert rows[0] == ("1", str(best.layer), str(best.unit), f"{best.correlation:+.3f}")
    assert len(rows) == 2
    assert "gate saturation" in result.stdout


def test_inspect_refuses_bad_options_in_one_line(quote_run: tuple[Path, str]) -> None:
    runs_dir, run = quote_run
    base = ["inspect", "--run", run, "--runs-dir", str(runs_dir)]
    for args, message in [
        ([], "exactly one of --text or --file"),
        (["--text", "ab", "--gate", "memory"], "the LSTM has no gate 'memory'"),
        (["--text", "ab", "--gate", ""], "the LSTM has no gate ''"),  # was the default gate, unsaid
        (["--text", "ab", "--layer", "3"], "layer 3 does not exist"),
        (["--text", "ab", "--unit", "16"], "unit 16 does not exist"),
        (["--text", "ab", "--find", "("], "invalid regular expression"),
    ]:
        result = cli(*base + args)
        assert result.code == 1, (args, result.stdout + result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_inspect_reads_a_regular_file_only_and_only_so_much(quote_run: tuple[Path, str], tmp_path: Path) -> None:
    """A real process each, its memory bounded: /dev/zero and a FIFO nobody writes are refused
    at once (they were read until memory ran out, or waited for ever); a text longer than
    --text could carry is refused; one just within the bound is inspected."""
    runs_dir, run = quote_run
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    long = tmp_path / "long.txt"
    long.write_text("ab cd " * (MAX_TEXT_BYTES // 6 + 1), encoding="utf-8")
    for path, message in [
        (Path("/dev/zero"), "/dev/zero is not a regular file"),
        (fifo, f"{fifo} is not a regular file"),
        (long, f"{long} is too long to read whole (over {MAX_TEXT_BYTES:,} bytes)"),
    ]:
        result = lstmlm_process("inspect", "--run", run, "--runs-dir", runs_dir, "--file", path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    short = tmp_path / "short.txt"
    short.write_text('a "quote" here\n', encoding="utf-8")
    assert cli("inspect", "--run", run, "--runs-dir", str(runs_dir), "--file", str(short)).code == 0


# ---- saturation -----------------------------------------------------------------------------------


def test_saturation_counts_the_time_each_gate_spends_beyond_the_thresholds() -> None:
    I = torch.tensor([[0.05, 0.5], [0.05, 0.95], [0.5, 0.95], [0.95, 0.95]])  # (4 steps, 2 units)
    half = torch.full((4, 2), 0.5)
    layer = units.LayerActivations(cells.get("lstm"), {"I": I, "F": half, "O": half, "C_tilde": half * 0, "C": half * 0, "H": half * 0})
    stats = {s.gate: s for s in units.saturation([layer])}
    assert stats["input"].left.tolist() == [0.5, 0.0]
    assert stats["input"].right.tolist() == [0.25, 0.75]
    assert stats["forget"].left.tolist() == [0.0, 0.0] and stats["forget"].right.tolist() == [0.0, 0.0]
    assert set(stats) == {"input", "forget", "output"}


def test_a_cell_without_sigmoid_gates_says_so_in_place_of_an_empty_saturation_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The RNN has only H: the terminal and the page say there is nothing to saturate, not a bare header."""
    monkeypatch.setenv("LSTMLM_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "quotes.txt"
    corpus.write_text(quoted_corpus(20), encoding="utf-8")
    runs = tmp_path / "runs"
    trained = cli("train", "--corpus", corpus, "--normalize", "raw", "--cell", "rnn", "--hidden", "8", "--epochs", "1",
                  "--batch-size", "4", "--num-steps", "8", "--device", "cpu", "--run", "rnn", "--runs-dir", runs)  # fmt: skip
    assert trained.code == 0, trained.stderr
    shown = cli("inspect", "--runs-dir", runs, "--run", "rnn", "--text", "ab cd", "--html", tmp_path / "page.html")
    assert shown.code == 0, shown.stderr
    assert "the RNN has no sigmoid gate: none to saturate" in shown.stdout and "time < 0.1" not in shown.stdout
    page = (tmp_path / "page.html").read_text(encoding="utf-8")
    assert "the RNN has no sigmoid gate: none to saturate" in page and "time &lt; 0.1" not in page


# ---- the HTML page -------------------------------------------------------------------------------


class PageParser(html.parser.HTMLParser):
    """The characters of the #text element (one span each) and the embedded data."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chars: list[str] = []
        self.data = ""
        self._in_text = self._in_span = self._in_data = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id") == "text":
            self._in_text = True
        elif tag == "span" and self._in_text:
            self._in_span = True
            self.chars.append("")
        elif attributes.get("id") == "lstmlm-data":
            self._in_data = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._in_span:
            self._in_span = False
        elif tag == "div" and self._in_text:
            self._in_text = False
        elif tag == "script":
            self._in_data = False

    def handle_data(self, data: str) -> None:
        if self._in_span:
            self.chars[-1] += data
        elif self._in_data:
            self.data += data


def decode(entry: dict, steps: int) -> torch.Tensor:
    """The page's quantized values back to (steps, hiddens)."""
    q = torch.tensor(list(base64.b64decode(entry["q"])), dtype=torch.float64)
    return (entry["lo"] + q / 255 * (entry["hi"] - entry["lo"])).reshape(-1, steps).T


def test_html_page_from_a_trained_run_holds_the_text_and_every_unit(quote_run: tuple[Path, str], tmp_path: Path) -> None:
    runs_dir, run = quote_run
    text = quoted_corpus(3, seed=2) + "tricky: </script> <b>bold</b> & {{data}} \\u003c\r\n"
    page_file = tmp_path / "page.html"
    result = cli(
        *[
            "inspect",
            "--run",
            run,
            "--runs-dir",
            str(runs_dir),
            "--text",
            text,
            "--find",
            QUOTE,
            "--html",
            str(page_file),
        ]
    )
    assert result.code == 0, result.stdout + result.stderr

    page = page_file.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "src=" not in page  # self-contained
    parser = PageParser()
    parser.feed(page)
    assert parser.chars == list(text)  # every character, once each, in order, escaped and back
    data = json.loads(parser.data)

    trained = load_trained(runs_dir, run)
    model, vocab = trained.model, trained.vocab
    layers = units.activations(model, vocab, text)
    assert data["steps"] == len(text) and data["hiddens"] == 16 and len(data["values"]) == 1
    gates = {g.name: g for g in model.cell.gates}
    assert set(data["values"][0]) == set(gates) and data["gates"] == [g.name for g in model.cell.gates]
    for gate, entry in data["values"][0].items():
        values = decode(entry, len(text))
        assert values.shape == (len(text), 16)  # every unit of every gate is in the page
        low, high = gates[gate].low, gates[gate].high
        if low is not None and high is not None:
            assert low <= values.min() and values.max() <= high
        step = (entry["hi"] - entry["lo"]) / 255
        assert torch.allclose(values, layers[0].gate(gate).double(), atol=step / 2 + 1e-6)
        # the page colours by lstmlm's one colour scale: level q's colour is units.colour of its value's level
        for q in (0, 1, 127, 200, 255):
            value = torch.tensor(entry["lo"] + q / 255 * (entry["hi"] - entry["lo"]), dtype=torch.float64)
            assert entry["palette"][q] == "#{:02x}{:02x}{:02x}".format(*units.colour(float(units.level(gates[gate], value))))
    ranked = units.find_units(layers, text, QUOTE)
    assert (data["ranking"][0]["layer"], data["ranking"][0]["unit"]) == (ranked[0].layer, ranked[0].unit)


def test_html_page_refuses_a_text_of_another_length() -> None:
    vocab = Vocab.build("abc")
    layers = units.activations(randomized(CharLM(len(vocab), 4)), vocab, "abc")
    with pytest.raises(InspectError, match="3 steps"):
        units_page.html_page(layers, "abcd")


def test_a_command_lines_byte_that_is_not_utf8_is_a_replacement_character_on_the_page() -> None:
    """`--text $'ab\\xff'` reaches Python as 'ab\\udcff' (a lone surrogate), which a UTF-8 page
    cannot hold: writing the page failed ('cannot write the page …: UnicodeEncodeError')."""
    vocab = Vocab.build("abc")
    text = "ab\udcff"
    layers = units.activations(randomized(CharLM(len(vocab), 4)), vocab, text)
    page = units_page.html_page(layers, text, title="lstmlm inspect · \udcff", regex="\udcff")
    assert "\ufffd" in page and "\udcff" not in page
    page.encode("utf-8")  # raises UnicodeEncodeError where a lone surrogate is left
