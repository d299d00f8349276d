"""Encoded corpora, cached by content: a second run on the same text skips decoding and encoding.

`$LSTMLM_HOME/encoded/<sha1 of the files>-<mode>.pt` holds the vocabulary built from the text
and its ids (int32). The key is the content's hash, so an edited corpus is simply a new entry.
The cache is only an accelerator: an unreadable or unwritable entry is ignored, never an error.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..corpus import cache_dir
from ..errors import LstmlmError
from ..vocab import Vocab
from .text import content_sha1


def entry(path: Path, mode: str) -> Path:
    return cache_dir() / "encoded" / f"{content_sha1(path)}-{mode}.pt"


def load(where: Path) -> tuple[Vocab, torch.Tensor] | None:
    if not where.is_file():
        return None
    try:
        payload = torch.load(where, map_location="cpu", weights_only=True)
        vocab, ids = Vocab.from_json(payload["vocab"]), payload["ids"]
    except Exception:  # any damage (truncated, foreign, unsafe): rebuild from the text
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int32 or ids.dim() != 1:
        return None
    return vocab, ids


def save(where: Path, vocab: Vocab, ids: torch.Tensor) -> None:
    with contextlib.suppress(OSError, LstmlmError):
        where.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(where, lambda f: torch.save({"vocab": vocab.to_json(), "ids": ids}, f), "encoded-corpus cache")
