"""The prefixes a training samples from as it goes, so its samples say something of the text.

d2l's two prefixes ("time traveller", "traveller") on d2l's text; on one's own text, words of
its own: a prefix from The Time Machine says nothing of how a model of Moby-Dick is doing.
"""

from __future__ import annotations

from .config import Config
from .data.pipeline import Data
from .sampling import D2L_PREFIXES

SAMPLE_PREFIX_CHARS = 16  # at most, whole words


def sample_prefixes(cfg: Config, data: Data) -> list[str]:
    """What training samples from: d2l's two prefixes on d2l's text (The Time Machine, or any
    text read the seed's way); on one's own text, its own words — the opening of the first
    paragraph past the middle of the training text (at most SAMPLE_PREFIX_CHARS, whole words),
    the kind of text the model is learning, not a front matter's."""
    d2l = cfg.data.normalize == "d2l" or cfg.data.corpus == "timemachine"
    fits = [p for p in D2L_PREFIXES if data.vocab.knows(p)]
    if d2l:
        return fits
    middle = len(data.train) // 2
    window = data.vocab.decode(data.train[middle : middle + 64 * SAMPLE_PREFIX_CHARS])  # the model's symbols (bytes mode: bytes)
    paragraph = window.find("\n\n")
    line = window[paragraph + 2 :] if paragraph >= 0 else window[window.find("\n") + 1 :]
    line = line.lstrip().split("\n")[0]
    if len(line) > SAMPLE_PREFIX_CHARS and " " in line[: SAMPLE_PREFIX_CHARS + 1]:
        line = line[: SAMPLE_PREFIX_CHARS + 1].rsplit(" ", 1)[0]
    prefix = line[:SAMPLE_PREFIX_CHARS]
    return [prefix] if prefix.strip() and data.vocab.knows(prefix) else [data.vocab.decode(data.train[:8])]
