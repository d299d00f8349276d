"""What a resume may do: the stored run's config, plus the options a resume may change
(config.RESUMABLE, saved into the run), or a refusal with its reason — a --config file or any
other option that disagrees with the stored config (naming the keys), a run that never wrote a
checkpoint, a corpus whose content is not the one the run was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import config
from .config import Config
from .data.pipeline import Data
from .errors import CheckpointError, ConfigError, CorpusError
from .runs import LATEST, RunStore


def resumable_changes(stored: Config, file: Config, written: frozenset[str], given: dict[str, Any], config_file: Path | None) -> dict[str, Any]:
    """What a resume changes in the stored config: the options a resume may change
    (config.RESUMABLE), over those a --config file writes. Any other option, or a file, that
    disagrees with the stored config is refused, naming each key that differs."""
    if config_file is not None:
        asked, kept = file.with_overrides(given).resolved(), stored.resolved()  # a run made before corpus paths were stored absolute: its own made so
        compared = written | set(given) if asked.train.recipe == "on" else config.field_names()  # the rest the recipe chose
        differ = [k for k in compared if k not in config.RESUMABLE and asked.value(k) != kept.value(k)]
        if differ:
            what = ", ".join(f"{k} (the run's {stored.value(k)!r}, here {asked.value(k)!r})" for k in differ)
            raise ConfigError(
                f"--resume keeps the run's stored config, and {config_file} (with the options given) differs from it in {what}: "
                f"give the command that started the run, plus --resume, or start a new --run"
            )
    for key, value in given.items():
        if key not in config.RESUMABLE and value != stored.value(key) and not resolves_to(stored, key, value):
            raise ConfigError(f"--resume keeps the run's stored {key} = {stored.value(key)!r}; it cannot change to {value!r} (start a new --run instead)")
    from_file = {k: file.value(k) for k in written if k in config.RESUMABLE}
    changes = {**from_file, **{k: v for k, v in given.items() if k in config.RESUMABLE}}
    if changes.get("precision") == "auto":  # chosen once, as the run was made: a resume trains on in what it chose
        del changes["precision"]
    return changes


def resolves_to(stored: Config, key: str, value: Any) -> bool:
    """Whether `value` is the stored config's own for `key` once resolved for the run's corpus: a
    run keeps its "auto" and -1 resolved (normalize raw, max_tokens 0) and its corpus's path
    absolute, so the command that started it says them so."""
    try:
        return bool(stored.with_overrides({key: value}).resolved().value(key) == stored.resolved().value(key))
    except ConfigError:  # not even valid beside the run's other settings: a change, refused as one
        return False


def check_same_corpus(store: RunStore, data: Data, corpus: str) -> None:
    """Refuse to resume on a corpus whose content is not the one the run was created from (an
    edited file, or another one moved into its place)."""
    then, now = store.corpus_sha1, data.source_sha1
    if then is not None and now is not None and then != now:
        raise CorpusError(
            f"the corpus {corpus} has changed since run {store.name} was created (SHA-1 {then} then, {now} now): restore it, or train a new --run on it"
        )


def check_resumable(store: RunStore) -> None:
    """Refuse a run with no checkpoint: resumed, it would start over, overwriting its best.pt and
    logging its epochs twice (asked while the run is held, so a training still on its way to
    its first checkpoint is reported as in use instead)."""
    if not store.has_checkpoint(LATEST):
        raise CheckpointError(
            f"run {store.root} has no checkpoint to resume from: it stopped before writing its first (delete {store.root} and train it again)"
        )
