"""enwik8 and bytes mode: `lstmlm download enwik8` against a loopback server serving a small zip
made here (the real archive's SHA-1 is pinned in the code and refuses it), unzipped into the
cache; the standard 90/5/5 split on a scaled-down file; bits per byte from `evaluate`."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import zipfile
from pathlib import Path

import pytest
import torch

import lstmlm.data.download as corpus
from lstmlm.config import Config
from lstmlm.data.pipeline import prepare_data
from lstmlm.errors import CorpusError

from support.cli import assert_one_error_line, cli
from support.loopback import LoopbackServer

PINNED_SHA1 = "d856b1ccd937c51aeb9c342e47666fb8c38e7e72"  # enwik8.zip, 36,445,475 bytes


def scaled_enwik8(size: int = 100_000, seed: int = 8) -> bytes:
    """Wikipedia-like XML with UTF-8 and a few bytes that are not UTF-8, as enwik8 has."""
    rng = random.Random(seed)
    words = ["<page>", "<title>", "Anarchism", "</title>", "[[Category:", "]]", "&amp;", "Zürich", "—", "時間", "\n", "the", "of"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words).encode("utf-8") + b" "
        if rng.random() < 0.01:
            out += b"\xff"
    return bytes(out[:size])


def zipped(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return buffer.getvalue()


def test_the_real_archives_sha1_is_pinned() -> None:
    known = corpus.KNOWN["enwik8"]
    assert (known.url, known.sha1, known.member, known.normalize, known.split) == (
        "http://mattmahoney.net/dc/enwik8.zip", PINNED_SHA1, "enwik8", "bytes", "90M,5M,5M",
    )  # fmt: skip


@pytest.fixture
def served_zip(serve_dir: Path, http_server: LoopbackServer, monkeypatch: pytest.MonkeyPatch) -> tuple[LoopbackServer, bytes, bytes]:
    """The loopback server with a small enwik8.zip, and the known corpus expecting its SHA-1."""
    data = scaled_enwik8()
    archive = zipped("enwik8", data)
    (serve_dir / "enwik8.zip").write_bytes(archive)
    known = corpus.KNOWN["enwik8"]
    monkeypatch.setitem(corpus.KNOWN, "enwik8", dataclasses.replace(known, sha1=hashlib.sha1(archive).hexdigest()))
    return http_server, archive, data


def test_download_enwik8_verifies_and_unzips_into_the_cache(served_zip: tuple[LoopbackServer, bytes, bytes], isolated_cache: Path) -> None:
    server, archive, data = served_zip
    result = cli("download", "enwik8", "--url", server.url("enwik8.zip"))
    assert result.code == 0, result.stderr
    path = isolated_cache / "enwik8"
    summary = f"{len(data):,} bytes, {len(set(data)):,} distinct bytes (not UTF-8 text: train on it with --normalize bytes)"
    assert result.stdout.splitlines() == [str(path), summary]
    assert path.read_bytes() == data and (isolated_cache / "enwik8.zip").read_bytes() == archive
    again = cli("download", "enwik8", "--url", server.url("enwik8.zip"))
    assert again.code == 0 and again.stdout == result.stdout
    assert server.requests == ["/enwik8.zip"]  # the verified, unzipped copy: no network the second time


def test_the_pinned_sha1_refuses_any_other_archive(serve_dir: Path, http_server: LoopbackServer, isolated_cache: Path) -> None:
    archive = zipped("enwik8", scaled_enwik8())
    (serve_dir / "enwik8.zip").write_bytes(archive)
    result = cli("download", "enwik8", "--url", http_server.url("enwik8.zip"))
    assert_one_error_line(result, f"checksum mismatch (expected SHA-1 {PINNED_SHA1}, got {hashlib.sha1(archive).hexdigest()})")
    assert not any(isolated_cache.iterdir())


def test_a_damaged_archive_leaves_no_corpus(serve_dir: Path, http_server: LoopbackServer, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = bytearray(zipped("enwik8", scaled_enwik8()))
    archive[60] ^= 0xFF  # inside the compressed member: its CRC no longer matches
    (serve_dir / "enwik8.zip").write_bytes(bytes(archive))
    known = corpus.KNOWN["enwik8"]
    monkeypatch.setitem(corpus.KNOWN, "enwik8", dataclasses.replace(known, sha1=hashlib.sha1(archive).hexdigest()))
    result = cli("download", "enwik8", "--url", http_server.url("enwik8.zip"))
    assert_one_error_line(result, f"{isolated_cache / 'enwik8.zip'} is damaged")
    assert not (isolated_cache / "enwik8").exists() and not list(isolated_cache.glob(".enwik8*"))


def test_enwik8_reads_as_bytes_with_its_standard_split() -> None:
    cfg = Config().with_overrides({"corpus": "enwik8"}).resolved()
    assert (cfg.data.normalize, cfg.data.split, cfg.data.val_fraction, cfg.data.max_tokens) == ("bytes", "90M,5M,5M", 0.0, 0)


def test_the_90_5_5_split_on_a_scaled_down_file(tmp_path: Path) -> None:
    """A 100,000-byte enwik8 split as the real one is, a thousand times smaller: the first 90%
    trains, the next 5% validates, the last 5% tests — every byte a token, none <unk>."""
    data = scaled_enwik8()
    path = tmp_path / "enwik8"
    path.write_bytes(data)
    prepared = prepare_data(Config().with_overrides({"corpus": str(path), "normalize": "bytes", "split": "90k,5k,5k"}).resolved())
    assert len(prepared.vocab) == 256 and prepared.train.dtype == torch.uint8
    assert bytes(prepared.train.tolist()) == data[:90_000]
    assert bytes(prepared.val.tolist()) == data[90_000:95_000]
    assert bytes(prepared.test.tolist()) == data[95_000:]
    with pytest.raises(CorpusError, match=r"the split 90M,5M,5M asks for 100,000,000 tokens; the corpus has 100,000"):
        prepare_data(Config().with_overrides({"corpus": str(path), "normalize": "bytes", "split": "90M,5M,5M"}).resolved())


def test_evaluate_reports_bits_per_byte_on_the_runs_test_text(tmp_path: Path, runs_dir: Path) -> None:
    path = tmp_path / "enwik8"
    path.write_bytes(scaled_enwik8(20_000))
    train = ["train", "--corpus", path, "--normalize", "bytes", "--split", "18k,1k,1k", "--runs-dir", runs_dir, "--run", "b",
             "--hidden", "16", "--embedding", "8", "--batch-size", "8", "--num-steps", "20", "--epochs", "1", "--device", "cpu"]  # fmt: skip
    trained = cli(*train)
    assert trained.code == 0, trained.stderr
    assert "bits per byte" in trained.stdout and "bpb" in trained.stderr and "bpc" not in trained.stderr
    (score,) = cli("evaluate", "--part", "test", "--run", "b", "--runs-dir", runs_dir, "--json").json()
    assert (score["unit"], score["characters"], score["unknown_characters"]) == ("byte", 1000, 0)
    assert score["bits_per_char"] == pytest.approx(score["loss"] / 0.6931471805599453)
    human = cli("evaluate", "--part", "test", "--run", "b", "--runs-dir", runs_dir)
    assert human.stdout.startswith("test text: perplexity ") and " bits per byte (" in human.stdout
    assert_one_error_line(cli("evaluate", "--part", "test", path, "--run", "b", "--runs-dir", runs_dir), "give a FILE to score, or --part")


def test_a_bytes_model_generates_text_from_a_text_prefix(tmp_path: Path, runs_dir: Path) -> None:
    """The prefix is read as its UTF-8 bytes and the bytes made are shown decoded."""
    path = tmp_path / "text.bin"
    path.write_bytes(("Zürich — 時間 the time traveller\n" * 200).encode("utf-8"))
    assert cli("train", "--corpus", path, "--normalize", "bytes", "--runs-dir", runs_dir, "--run", "b", "--hidden", "32",
               "--batch-size", "8", "--num-steps", "20", "--epochs", "3", "--optimizer", "adam", "--lr", "0.02", "--device", "cpu").code == 0  # fmt: skip
    result = cli("generate", "--run", "b", "--runs-dir", runs_dir, "--prefix", "Zürich", "--length", "40")
    assert result.code == 0, result.stderr
    assert result.stdout.startswith("Zürich") and "Ã" not in result.stdout  # decoded, not shown as Latin-1


@pytest.fixture(scope="module")
def bytes_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A runs directory with "b", a tiny bytes model of text with two- and three-byte characters."""
    root = tmp_path_factory.mktemp("bytes-runs")
    path = root / "text.bin"
    path.write_bytes(("Zürich — 時間 the time traveller\n" * 200).encode("utf-8"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        trained = cli("train", "--corpus", path, "--normalize", "bytes", "--runs-dir", root / "runs", "--run", "b", "--hidden", "32",
                      "--batch-size", "8", "--num-steps", "20", "--epochs", "3", "--optimizer", "adam", "--lr", "0.02", "--device", "cpu")  # fmt: skip
    assert trained.code == 0, trained.stderr
    return root / "runs"


def test_a_bytes_models_stop_string_of_any_characters_ends_the_text(bytes_runs: Path) -> None:
    """A stop string is matched against the bytes the model writes: 'ü' (two bytes) or '時' (three)
    ended nothing when they were compared with the bytes as Latin-1 characters."""
    from fastapi.testclient import TestClient

    from lstmlm.serve.app import create_app

    args = ["generate", "--run", "b", "--runs-dir", bytes_runs, "--prefix", "Zürich", "--length", "120"]
    full = cli(*args).stdout.removesuffix("\n")
    made = full.removeprefix("Zürich")
    stop = next(c for c in made if ord(c) > 127)  # the first character of more than one byte
    stopped = cli(*args, "--stop", stop)
    assert stopped.code == 0, stopped.stderr
    assert stopped.stdout == "Zürich" + made[: made.index(stop)] + "\n"
    body = {"run": "b", "prefix": "Zürich", "length": 120, "stop": [stop], "stream": False}
    answer = TestClient(create_app(bytes_runs)).post("/api/generate", json=body).json()
    assert (answer["text"], answer["finish_reason"]) == (made[: made.index(stop)], "stop")


def test_a_bytes_model_is_inspected_one_character_a_step(bytes_runs: Path, tmp_path: Path) -> None:
    """Each character is shown once, coloured by the step of its last byte (the model has read it
    whole), in the terminal, the page and /api/inspect; it was shown as its bytes read as Latin-1
    ('ZÃ¼rich'), said to be 'normalized (d2l)', and the serve page, whose text never began
    with that, coloured nothing."""
    from fastapi.testclient import TestClient

    from lstmlm.inference import load
    from lstmlm.serve.app import create_app
    from lstmlm.units import activations

    text = "Zürich — 時間 the"
    page = tmp_path / "page.html"
    shown = cli("inspect", "--run", "b", "--runs-dir", bytes_runs, "--text", text, "--unit", "3", "--gate", "hidden", "--html", page)
    assert shown.code == 0, shown.stderr
    assert text in shown.stdout and "Ã" not in shown.stdout and "normalized" not in shown.stderr
    written = page.read_text(encoding="utf-8")
    assert "".join(f"<span>{c}</span>" for c in text) in written and f'"steps":{len(text)},' in written
    answer = TestClient(create_app(bytes_runs)).post("/api/inspect", json={"run": "b", "text": text, "gate": "hidden", "units": [3]}).json()
    assert (answer["text"], answer["normalized"], answer["unknown"]) == (text, False, [])
    trained = load(bytes_runs, "b")
    H = activations(trained.model, trained.vocab, text.encode("utf-8").decode("latin-1"))[-1].H  # (bytes, hiddens)
    last = [len(text[: i + 1].encode("utf-8")) - 1 for i in range(len(text))]
    assert answer["units"][0]["values"] == pytest.approx(H[last, 3].tolist(), abs=1e-4)
