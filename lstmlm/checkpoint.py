"""Checkpoints: a run's `latest.pt` and `best.pt`, written atomically and read without running code.

A checkpoint is one `torch.save` archive of plain data: the format and its version, the config
and vocabulary as JSON, the weights, the trainer's state and the prime text. It is loaded with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, so a crafted
file cannot run code; anything else is refused with the reason. Before torch reads it, the
archive is checked the way torch.save writes one: every entry stored, none compressed (a small
crafted file could otherwise inflate to gigabytes) and none larger than the archive holds.

Every format lstmlm ever wrote still loads: `migrate` brings a checkpoint of any older version
up to `VERSION`, one step a format, in the order they came (tests/fixtures/ holds one of each).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from . import cells, config_file
from . import config as config_mod
from .atomic import write_atomic
from .config import Config
from .errors import CheckpointError, ConfigError, VocabError
from .model import scratch_key
from .runs import LATEST, RunStore, open_regular
from .vocab import Vocab, describe_chars

FORMAT = "lstmlm-checkpoint"
VERSION = 2  # 2: the trainer's state names its batch index "batch"; every older layout brought up to date


def save(
    store: RunStore,
    cfg: Config,
    vocab: Vocab,
    model: dict[str, torch.Tensor],
    trainer: dict[str, Any],
    which: str = LATEST,
    prime: str = "",
) -> Path:
    """Write `store`'s `which` checkpoint. `prime`: text for generation to read before a prefix."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_json(),
        "vocab": vocab.to_json(),
        "model": {k: v.detach().cpu() for k, v in model.items()},
        "trainer": trainer,
        "prime": prime,
    }
    path = store.path(which)
    write_atomic(path, lambda f: torch.save(payload, f), "checkpoint")
    return path


def load(store: RunStore, which: str = LATEST) -> dict[str, Any]:
    path = store.path(which)
    if not path.is_file():
        raise CheckpointError(f"run {store.root} has no {which} checkpoint yet")
    return load_checkpoint(path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, refusing anything that is not plain data of our format (read
    from the file itself: a symbolic link in its place is refused)."""
    try:
        f = os.fdopen(open_regular(path, os.O_RDONLY), "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        check_archive(f, path)
        f.seek(0)
        payload = _unpickle(f, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lstmlm checkpoint")
    return check_sections(migrate(payload, path), path)


def check_archive(f: IO[bytes], path: Path) -> None:
    """Refuse what torch.save does not write: not a zip (cut short, or foreign), a compressed
    entry, or an entry that claims more bytes than the archive has."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise CheckpointError(f"{path} is corrupt or truncated (empty)")
    try:
        entries = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):  # torch.save writes a zip; anything else is cut short or foreign
        raise CheckpointError(f"{path} is corrupt or truncated (not a complete checkpoint archive)") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"refusing {path}: its entry {entry.filename!r} is compressed, and lstmlm checkpoints never are")
        if entry.file_size != entry.compress_size or entry.header_offset + entry.compress_size > size:
            raise CheckpointError(f"refusing {path}: its entry {entry.filename!r} claims {entry.file_size:,} bytes, more than the archive holds")


def _unpickle(f: IO[bytes], path: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would call {unsafe.group(1)}" if unsafe else "unsafe content"
        raise CheckpointError(f"refusing to load {path}: it holds more than plain weights ({what})") from None
    except Exception as e:  # any other damage: weights_only loading cannot have run code from it
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__})") from None


# ---- older formats ---------------------------------------------------------------------------
#
# Version 1 covered several layouts, written before the version was ever moved; each step below
# recognizes its own and leaves the others alone. From version 2 on, a format is a version:
# a new one adds `VERSION + 1` to MIGRATIONS with the step that brings the one before up to it.


def _config_before_cadences(payload: dict[str, Any]) -> None:
    """Version 1, before cadences and before cells: the stored config counted checkpoints and
    samples in epochs, validations in steps, and had no `cell` (config.upgrade says how; a
    run's config.json, read without torch, takes the same step)."""
    if isinstance(payload.get("config"), str):
        with contextlib.suppress(ValueError, RecursionError):  # not JSON: checkpoint_config says so
            payload["config"] = json.dumps(config_file.upgrade(json.loads(payload["config"])), indent=2, sort_keys=True)


def _twelve_tensor_lstm(payload: dict[str, Any]) -> None:
    """Version 1, the first release: each scratch LSTM layer as the article's twelve tensors
    (W_xi, W_hi, b_i, …), now packed into W_x, W_h, b; the optimizer's state per parameter
    (momentum, Adam's moments) packed the same way, since it is laid out as the weights are."""
    weights = payload.get("model")
    if not isinstance(weights, dict) or not any(isinstance(k, str) and re.match(r"core\.layers\.\d+\.W_xi$", k) for k in weights):
        return
    payload["model"] = _packed_layers(weights)
    optimizer = payload["trainer"].get("optimizer") if isinstance(payload.get("trainer"), dict) else None
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):
        return
    old = list(weights)  # a state dict's order is its parameters' order, which the optimizer's indices follow
    per_param = {old[i]: state for i, state in optimizer["state"].items() if isinstance(i, int) and i < len(old)}
    packed_state: dict[int, dict[str, Any]] = {}
    if per_param and len(per_param) == len(old):  # else none kept yet (plain SGD keeps none)
        first = next(iter(per_param.values()))
        for key, value in first.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # laid out as the weights: packed as they are
                for j, packed in enumerate(_packed_layers({name: per_param[name][key] for name in old}).values()):
                    packed_state.setdefault(j, {})[key] = packed
            else:  # Adam's step count, the same for every parameter
                for j in range(len(payload["model"])):
                    packed_state.setdefault(j, {})[key] = value
    optimizer["state"] = packed_state
    for group in optimizer.get("param_groups", []):
        group["params"] = list(range(len(payload["model"])))


def _packed_layers(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A first-release state dict (or anything laid out as one) with each scratch LSTM layer's
    twelve tensors packed into three, in the order today's model holds its parameters."""
    lstm = cells.get("lstm")
    packed = {k: v for k, v in tensors.items() if not k.startswith("core.")}
    for layer in sorted({int(m.group(1)) for k in tensors if (m := re.match(r"core\.layers\.(\d+)\.", k))}):
        named = {name: tensors[scratch_key(layer, name)] for name in lstm.parameter_names()}
        packed.update({scratch_key(layer, name): p for name, p in lstm.pack(named).items()})
    return packed


def _trainer_state_v1(payload: dict[str, Any]) -> None:
    """Version 1's trainer state: an unused "extra"; best.pt's figure as `best_val` alone
    (before `best_saved`); the batch within the epoch named "step"."""
    trainer = payload.get("trainer")
    state = trainer.get("state") if isinstance(trainer, dict) else None
    if not isinstance(state, dict):
        return
    state.pop("extra", None)
    if "best_saved" not in state and "best_val" in state:
        state["best_saved"] = state["best_val"]
    if "step" in state:
        state["batch"] = state.pop("step")


def _no_prime(payload: dict[str, Any]) -> None:
    """Version 1, before generation read a prime: no "prime" section."""
    payload.setdefault("prime", "")


MIGRATIONS: dict[int, list[Callable[[dict[str, Any]], None]]] = {
    2: [_config_before_cadences, _twelve_tensor_lstm, _trainer_state_v1, _no_prime],  # version 1 → 2
}


def migrate(payload: dict[str, Any], path: Path | str = "the checkpoint") -> dict[str, Any]:
    """A checkpoint of any version lstmlm wrote, brought up to `VERSION` step by step (in place,
    and returned); one of a later version, or of none, is refused with the reason."""
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > VERSION
        why = "a newer lstmlm wrote it: upgrade lstmlm to read it" if newer else "no lstmlm wrote such a version"
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this lstmlm reads versions 1 to {VERSION} ({why})")
    for target in range(version + 1, VERSION + 1):
        for step in MIGRATIONS[target]:
            step(payload)
        payload["version"] = target
    return payload


# Each section of a checkpoint and the type it must have.
SECTIONS: dict[str, type] = {"config": str, "vocab": str, "model": dict, "trainer": dict}


def check_sections(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """Every section of the type it is written with: a crafted file with a number for its
    config is refused here, not a TypeError later."""
    for key, kind in SECTIONS.items():
        if key not in payload:
            raise CheckpointError(f"{path} lacks its '{key}' section")
        if not isinstance(payload[key], kind):
            raise CheckpointError(f"{path} is damaged: its '{key}' section is a {type(payload[key]).__name__}, not a {kind.__name__}")
    weights = payload["model"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(f"{path} is damaged: its 'model' section holds something other than named tensors")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    try:
        return config_file.from_json(payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from None


def checkpoint_vocab(payload: dict[str, Any]) -> Vocab:
    try:
        return Vocab.from_json(payload["vocab"])
    except VocabError as e:
        raise CheckpointError(f"checkpoint vocabulary is invalid: {e}") from None


def checkpoint_prime(payload: dict[str, Any], vocab: Vocab) -> str:
    """The stored prime text, or "" where it does not fit the vocabulary."""
    prime = payload["prime"]
    return prime if isinstance(prime, str) and vocab.knows(prime) else ""


def check_compatible(payload: dict[str, Any], cfg: Config, vocab: Vocab, path: Path) -> None:
    """Refuse a checkpoint whose vocabulary or model is not this run's, naming what differs
    (a copied file can fit every tensor shape and still mean other characters)."""
    stored = checkpoint_vocab(payload)
    if stored != vocab:
        theirs, ours = set(stored.tokens) - set(vocab.tokens), set(vocab.tokens) - set(stored.tokens)
        diff = (
            f"only in the checkpoint: {describe_chars(theirs) or 'none'}; only in this run: {describe_chars(ours) or 'none'}"
            if theirs or ours
            else "the same characters in another order"
        )
        raise CheckpointError(f"{path} was trained on another vocabulary ({len(stored)} tokens; this run has {len(vocab)}; {diff})")
    trained = checkpoint_config(payload)
    for key in config_mod.MODEL_DEFINING:
        theirs_value, ours_value = trained.value(key), cfg.value(key)
        if theirs_value != ours_value:
            raise CheckpointError(f"{path} holds a model with {key} = {theirs_value!r}; this run has {key} = {ours_value!r}")


def load_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict, or say which tensor does not fit (torch's first line names none)."""
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        raise CheckpointError(f"the weights in {path} do not fit the model: {details[0][:300]}") from None
