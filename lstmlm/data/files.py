"""Which files a corpus is: one file, a directory's files, or a glob's, in a stable order.

    select("book.txt")             one file: a bad one (empty, unreadable, binary, not UTF-8) is an error
    select("books/")               every file below, hidden ones (.git) left out, sorted by path
    select("linux/**/*.[ch]")      a glob (** reaches into subdirectories), sorted by path

In a directory or a glob a bad file is skipped instead, reported as a `Skipped` (the CLI
prints one warning line for each and a count at the end), unless `--strict` makes it an error.

Below the directory given, or below a pattern's fixed part (`linux/` in `linux/**/*.c`), a
symbolic link to a directory is never entered: a link back up the tree (`self -> .`) would
otherwise list every file again at each level, and two such links would never finish. A link
to a file is read; the same file reached twice (a hard link, a link to a file of the corpus)
is read once, at its first path, and `Selection.duplicates` counts the others.

A selection's `signature` — every file's path, size, modification time and inode — keys the
cache's index from a corpus to its content hash, so a second run on an unchanged corpus finds
its encoded ids without reading a byte of the text. Imports no torch.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorpusError
from .download import StageProgress, locate


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    size: int
    mtime_ns: int
    inode: int
    device: int = 0


@dataclass(frozen=True)
class Selection:
    source: str  # the corpus as given: a name, a path or a pattern
    files: tuple[CorpusFile, ...]  # in reading order
    many: bool  # a directory or a glob: a bad file is skipped, not fatal
    duplicates: int = 0  # paths left out as a file already selected under another path

    def signature(self, mode: str) -> str:
        """A hash of the mode and every file's path and stat: equal only for an unchanged corpus."""
        stats = [[os.path.abspath(f.path), f.size, f.mtime_ns, f.inode] for f in self.files]
        return hashlib.sha1(json.dumps([mode, stats]).encode()).hexdigest()

    @property
    def warnings(self) -> tuple[str, ...]:
        """One line for the user where files were left out as duplicates."""
        if not self.duplicates:
            return ()
        return (f"skipped {self.duplicates:,} path(s) to a file already read under another path (a hard or symbolic link): each file is read once",)


@dataclass(frozen=True)
class Skipped:
    """A file of a directory or glob corpus left out, and why."""

    path: str
    reason: str  # "empty", "unreadable (Permission denied)", "not UTF-8 (invalid byte at offset 12)", "looks binary (NUL byte at offset 4)"
    size: int

    @property
    def unreadable(self) -> bool:
        """Left out as it could not be read (no permission, gone since listed): not for what it holds."""
        return self.reason.startswith("unreadable")


def select(source: str, progress: StageProgress | None = None) -> Selection:
    """The files of a corpus: a known name (downloaded on first use), a file, a directory or a glob."""
    if glob.has_magic(source) and not Path(source).expanduser().exists():
        return _glob(source)
    path = locate(source, progress)
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise CorpusError(f"corpus directory {path} holds no files")
        return _many(source, files)
    if path.exists() and not path.is_file():  # a FIFO or a device has no size to plan by: it read as empty
        raise CorpusError(f"corpus {path} is not a regular file: give a file, a directory or a glob")
    return Selection(source, (_stat(path),), many=False)


def corpus_files(directory: Path) -> list[Path]:
    """The files of a directory corpus in reading order (by path): hidden files and folders
    (.git) left out, symbolic links to folders not entered."""
    found = []
    for root, folders, names in os.walk(directory):  # followlinks=False: a linked folder is listed, never entered
        folders[:] = [f for f in folders if not f.startswith(".")]
        found += [Path(root, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    return sorted(found)


def _glob(pattern: str) -> Selection:
    """The regular files a pattern matches (hidden ones only where the pattern names a dot), by path."""
    expanded = os.path.expanduser(pattern)
    fixed, parts = _fixed_part(expanded)
    matches = sorted(Path(p) for p in set(_matches(fixed, parts)) if os.path.isfile(p))
    if not matches:
        raise CorpusError(f"no files match the corpus pattern {pattern!r}")
    return _many(pattern, matches)


def _fixed_part(pattern: str) -> tuple[str, list[str]]:
    """A pattern cut where its first wildcard is: ("linux", ["**", "*.c"]) for linux/**/*.c."""
    parts = pattern.split(os.sep)
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    fixed = os.sep.join(parts[:first]) or (os.sep if pattern.startswith(os.sep) else "")
    return fixed, [p for p in parts[first:] if p]


def _matches(path: str, parts: list[str]) -> Iterator[str]:
    """The paths below `path` that `parts` match, glob's way ("**": any folders, hidden ones
    only by name), except that a symbolic link to a folder is never entered."""
    if not parts:
        yield path
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _matches(path, rest)  # no folder at all
        for entry in _entries(path):
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):
                yield from _matches(entry.path, parts)  # one folder deeper
            elif not rest:
                yield entry.path  # "**" last: every file below
        return
    if not glob.has_magic(head):
        named = os.path.join(path, head)
        if not rest or not os.path.islink(named):
            yield from _matches(named, rest)
        return
    for entry in _entries(path):
        if fnmatch.fnmatchcase(entry.name, head) and (head.startswith(".") or not entry.name.startswith(".")):
            if not rest:
                yield entry.path
            elif _is_folder(entry):
                yield from _matches(entry.path, rest)


def _entries(path: str) -> list[os.DirEntry[str]]:
    """A folder's entries (none where it cannot be read, or is not a folder)."""
    try:
        with os.scandir(path or os.curdir) as entries:
            return list(entries)
    except OSError:
        return []


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """A real folder: never a symbolic link to one."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _many(source: str, paths: list[Path]) -> Selection:
    """A directory's or a glob's files, each file once (by device and inode) at its first path."""
    files, seen = [], set()
    for path in paths:
        f = _stat(path)
        if (f.device, f.inode) not in seen:
            seen.add((f.device, f.inode))
            files.append(f)
    return Selection(source, tuple(files), many=True, duplicates=len(paths) - len(files))


def _stat(path: Path) -> CorpusFile:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror}") from None
    return CorpusFile(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
