"""Reading and normalizing corpora: the seed's d2l preprocessing exactly, raw mode, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lstmlm.data.text import normalize, read_text
from lstmlm.errors import CorpusError

from support.tiny import d2l_data

D2L_TOKENS = ["<unk>", " ", *"etainoshrdlmucfwgypbvkxzjq"]


def d2l_reference(path: Path) -> str:
    """The seed's read_time_machine + tokenize(char) + flatten, written as d2l writes it."""
    with open(path) as f:
        lines = f.readlines()
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]
    return "".join(token for line in lines for token in list(line))


# ---- d2l normalization ----


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("a--b  c\t\td", "a b c d"),  # each run of non-letters is one space
        ("  It's 1895...  ", "it s"),  # stripped at both ends
        ("him\nwas", "himwas"),  # lines joined with no separator
        ("end.\n\nStart", "endstart"),  # an empty line adds nothing
        ("one\r\ntwo\rthree\n", "onetwothree"),  # \r\n and \r end lines as universal newlines do
        ("Ünïcödé café", "n c d caf"),  # only ASCII letters survive
        ("a\x0cb\u2028c", "a b c"),  # form feed and U+2028 are not line ends for readlines()
        ("123\n!!!\n", ""),
    ],
)
def test_d2l_normalization_exact(text: str, expected: str) -> None:
    assert normalize(text, "d2l") == expected


@pytest.mark.parametrize("text", ["Hello,\r\n World!\n", "日本語 — “quoted” 😀\tend", "\n\n  x  \n"])
def test_raw_mode_keeps_every_character(text: str) -> None:
    assert normalize(text, "raw") == text


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(CorpusError, match="unknown normalization 'upper'"):
        normalize("abc", "upper")


def test_d2l_matches_the_seed_with_crlf_file(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"The Time\r\nMachine, by\rH. G. Wells\r\n\r\n[1898]\n")
    assert normalize(read_text(path), "d2l") == d2l_reference(path) == "the timemachine byh g wells"


# ---- read_text errors ----


def test_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=re.escape(f"corpus file not found: {path}")):
        read_text(path)


def test_empty_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CorpusError, match=re.escape(f"corpus {path} is empty")):
        read_text(path)


def test_nul_byte_is_binary(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"text\x00more")
    with pytest.raises(CorpusError, match=re.escape(f"corpus {path} looks binary (NUL byte at offset 4)")):
        read_text(path)


def test_invalid_utf8_gives_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait, naïve".encode() + " crème".encode("latin-1"))
    offset = len("café au lait, naïve ".encode()) + 2  # the latin-1 è after "cr"
    with pytest.raises(CorpusError, match=re.escape(f"corpus {path} is not UTF-8 (invalid byte at offset {offset})")):
        read_text(path)


def test_directory_is_read_in_sorted_order(tmp_path: Path) -> None:
    corpus_dir = tmp_path / "books"
    (corpus_dir / "b").mkdir(parents=True)
    (corpus_dir / "c.txt").write_text("C", encoding="utf-8")
    (corpus_dir / "a.txt").write_text("A", encoding="utf-8")
    (corpus_dir / "b" / "inner.txt").write_text("B", encoding="utf-8")
    (corpus_dir / ".hidden").write_text("H", encoding="utf-8")
    assert read_text(corpus_dir) == "ABC"


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="holds no files"):
        read_text(tmp_path)


def test_text_empty_after_normalization_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "digits.txt"
    path.write_text("1234\n5678\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty after d2l normalization"):
        d2l_data(path)


# ---- parity with d2l on the real Time Machine ----


@pytest.fixture(scope="module")
def timemachine(data_dir: Path) -> Path:
    return data_dir / "timemachine.txt"


# Each goes through `prepare_data`, the path `lstmlm train` takes, with configs/d2l.toml.


def test_timemachine_d2l_text(timemachine: Path) -> None:
    data = d2l_data(timemachine, max_tokens=0)  # the whole text
    text = data.vocab.decode(data.train)
    assert len(text) == 170_580
    assert text == d2l_reference(timemachine)
    assert text.startswith("the time machine by h g wellsithe time traveller for so it will be convenient to speak of himwas")


def test_timemachine_d2l_vocab(timemachine: Path) -> None:
    vocab = d2l_data(timemachine).vocab
    assert vocab.tokens == D2L_TOKENS
    assert len(vocab) == 28


def test_timemachine_first_10000_tokens(timemachine: Path) -> None:
    ids = d2l_data(timemachine).train  # max_tokens = 10000, no validation split
    expected = [D2L_TOKENS.index(c) for c in d2l_reference(timemachine)[:10_000]]
    assert ids.tolist() == expected
    assert ids[:5].tolist() == [3, 9, 2, 1, 3]  # "the t"


def test_timemachine_raw_keeps_the_file(timemachine: Path) -> None:
    data = d2l_data(timemachine, normalize="raw", max_tokens=0, val_fraction=0.0)
    text = data.vocab.decode(data.train)
    assert text == timemachine.read_text(encoding="utf-8")
    assert len(text) == 178_979
    assert len(set(text)) == 70
