"""Which files a corpus is: one file, a directory's files, or a glob's, in a stable order.

    select("book.txt")             one file: a bad one (empty, binary, not UTF-8) is an error
    select("books/")               every file below, hidden ones (.git) left out, sorted by path
    select("linux/**/*.[ch]")      a glob (** reaches into subdirectories), sorted by path

In a directory or a glob a bad file is skipped instead, reported as a `Skipped` (the CLI
prints one warning line for each and a count at the end), unless `--strict` makes it an error.

A selection's `signature` — every file's path, size, modification time and inode — keys the
cache's index from a corpus to its content hash, so a second run on an unchanged corpus finds
its encoded ids without reading a byte of the text. Imports no torch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..corpus import StageProgress, locate
from ..errors import CorpusError


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int
    mtime_ns: int
    inode: int


@dataclass(frozen=True)
class Selection:
    source: str  # the corpus as given: a name, a path or a pattern
    files: tuple[CorpusFile, ...]  # in reading order
    many: bool  # a directory or a glob: a bad file is skipped, not fatal

    def signature(self, mode: str) -> str:
        """A hash of the mode and every file's path and stat: equal only for an unchanged corpus."""
        stats = [[os.path.abspath(f.path), f.size, f.mtime_ns, f.inode] for f in self.files]
        return hashlib.sha1(json.dumps([mode, stats]).encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Skipped:
    """A file of a directory or glob corpus left out, and why."""

    path: str
    reason: str  # "empty", "not UTF-8 (invalid byte at offset 12)", "looks binary (NUL byte at offset 4)"
    size: int


def select(source: str, progress: StageProgress | None = None) -> Selection:
    """The files of a corpus: a known name (downloaded on first use), a file, a directory or a glob."""
    if glob.has_magic(source) and not Path(source).expanduser().exists():
        return _glob(source)
    path = locate(source, progress)
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise CorpusError(f"corpus directory {path} holds no files")
        return Selection(source, tuple(_stat(p) for p in files), many=True)
    return Selection(source, (_stat(path),), many=False)


def corpus_files(directory: Path) -> list[Path]:
    """The files of a directory corpus in reading order, hidden files and folders (.git) left out."""
    return sorted(
        p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def _glob(pattern: str) -> Selection:
    """The regular files a pattern matches (hidden ones only where the pattern names a dot), by path."""
    matches = sorted(Path(p) for p in set(glob.glob(os.path.expanduser(pattern), recursive=True)) if os.path.isfile(p))
    if not matches:
        raise CorpusError(f"no files match the corpus pattern {pattern!r}")
    return Selection(pattern, tuple(_stat(p) for p in matches), many=True)


def _stat(path: Path) -> CorpusFile:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror}") from None
    return CorpusFile(path, st.st_size, st.st_mtime_ns, st.st_ino)
