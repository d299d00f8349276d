"""Corpus text: reading files and directories as UTF-8, and the two normalizations.

Imports no torch: `lstmlm download` reads a file's summary with it and starts at once.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..corpus import sha1_of
from ..errors import CorpusError


def read_text(path: str | Path) -> str:
    """A UTF-8 file, or every file in a directory (sorted by name, joined), as one string."""
    path = Path(path)
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise CorpusError(f"corpus directory {path} holds no files")
        return "".join(_read_one(p) for p in files)
    return _read_one(path)


def corpus_files(directory: Path) -> list[Path]:
    """The files of a directory corpus in reading order, hidden files and folders (.git) left out."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _read_one(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"corpus path is a directory: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror}") from None
    if not data:
        raise CorpusError(f"corpus {path} is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"corpus {path} looks binary (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path} is not UTF-8 (invalid byte at offset {e.start})") from None


_NOT_LETTERS = re.compile("[^A-Za-z]+")


def normalize(text: str, mode: str) -> str:
    """`d2l`: the seed's preprocessing; `raw`: the text unchanged.

    d2l reads with readlines() (universal newlines), maps each run of non-letters to one space,
    strips and lowercases every line, then joins the lines with no separator at all.
    """
    if mode == "raw":
        return text
    if mode != "d2l":
        raise CorpusError(f"unknown normalization '{mode}' (expected d2l or raw)")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(_NOT_LETTERS.sub(" ", line).strip().lower() for line in lines)


def content_sha1(path: Path) -> str:
    """SHA-1 of a file, or of a directory's files in the order read_text joins them."""
    if not path.is_dir():
        return sha1_of(path)
    digest = hashlib.sha1()
    for p in corpus_files(path):
        digest.update(sha1_of(p).encode())
    return digest.hexdigest()
