"""The run store: atomic writes that survive a full disk, loading that never runs code, and a
clear error for every corrupt or foreign checkpoint; the lock that keeps one training per run."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lstmlm.checkpoint as checkpoint_mod
from lstmlm import checkpoint, config_file
from lstmlm.atomic import write_atomic
from lstmlm.checkpoint import VERSION, load_checkpoint
from lstmlm.errors import CheckpointError, WriteError
from lstmlm.events import EpochEnded
from lstmlm.progress import Progress
from lstmlm.runs import LATEST, RunStore
from lstmlm.train import Trainer

from support.cli import assert_one_error_line, cli
from support.faults import Payload
from support.tiny import synthetic_text

MakeTrainer = Callable[..., Trainer]


@pytest.fixture
def trained(make_trainer: MakeTrainer) -> Trainer:
    """A run with a latest checkpoint after 1 epoch."""
    trainer = make_trainer(epochs=1)
    list(trainer.run())
    return trainer


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


# ---- atomic writes ----------------------------------------------------------------------------


def test_disk_full_mid_write_is_a_clear_error_and_the_old_checkpoint_survives(trained: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    path = trained.store.path(LATEST)
    before = path.read_bytes()
    real_save = torch.save

    def save_until_the_disk_fills(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:1000])  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_mod.torch, "save", save_until_the_disk_fills)
    with pytest.raises(WriteError, match=rf"cannot write the checkpoint {path}: No space left on device"):
        trained.save()
    assert path.read_bytes() == before
    assert temp_files(trained.store.root) == []
    load_checkpoint(path)


def test_unwritable_run_directory_is_a_clear_error_and_the_old_checkpoint_survives(trained: Trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename is refused (tests run as root, so chmod cannot make the directory unwritable)."""
    path = trained.store.path(LATEST)
    before = path.read_bytes()

    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError, match=rf"cannot write the checkpoint {path}: Permission denied"):
        trained.save()
    assert path.read_bytes() == before
    assert temp_files(trained.store.root) == []


def test_write_atomic_replaces_whole_files_only(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    write_atomic(target, lambda f: f.write(b"old"))

    def crash(f: Any) -> None:
        f.write(b"new, half")
        raise KeyboardInterrupt  # anything, not only OSError

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, crash)
    assert target.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_metrics_line_cut_by_a_crash_is_skipped(trained: Trainer) -> None:
    with open(trained.store.metrics_path, "a") as f:
        f.write('{"epoch": 2, "train_perp')
    assert [r["epoch"] for r in trained.store.read_metrics()] == [1]


# ---- loading never runs code --------------------------------------------------------------------


@pytest.mark.parametrize("container", ["torch-zip", "plain-pickle"])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_the_code_does_not_run(trained: Trainer, tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = trained.store.path(LATEST)
    payload = {**load_checkpoint(path), "evil": Payload(marker)}
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match=rf"{path}"):
        checkpoint.load(trained.store)
    with pytest.raises(CheckpointError):
        Trainer(trained.store, trained.cfg, trained.data, trained.device, "fp32").resume()
    assert not marker.exists()

    # the file really is malicious: plain unpickling runs the payload
    unpickle_anything(path)
    assert marker.exists()


def unpickle_anything(path: Path) -> None:
    """Unpickle a plain pickle, or the pickle inside torch's zip (its tensors' storage
    answered with blank storage): what an unsafe loader would do with the file."""
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> torch.storage.TypedStorage:
            _, storage_type, _key, _location, numel = pid  # ('storage', type, key, device, numel)
            dtype = getattr(storage_type, "dtype", storage_type)
            return torch.storage.TypedStorage(numel, dtype=dtype, _internal=True)

    Unpickler(io.BytesIO(data)).load()


def test_the_refusal_says_why(trained: Trainer, tmp_path: Path) -> None:
    path = trained.store.path(LATEST)
    torch.save({**load_checkpoint(path), "evil": Payload(tmp_path / "x")}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*: it holds more than plain weights \(it would call \S+\)"):
        load_checkpoint(path)


# ---- corrupt and foreign checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -100, -1])
def test_truncated_checkpoint_is_a_clear_error(trained: Trainer, keep: float) -> None:
    path = trained.store.path(LATEST)
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=rf"{path} (is corrupt or truncated|is empty)"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, not a checkpoint\n", "is corrupt or truncated"),
        (json.dumps({"format": "lstmlm-checkpoint"}).encode(), "is corrupt or truncated"),
    ],
)
def test_a_file_that_is_not_a_checkpoint(trained: Trainer, content: bytes, message: str) -> None:
    path = trained.store.path(LATEST)
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": VERSION + 1}, rf"has checkpoint format version {VERSION + 1}; this lstmlm reads versions 1 to {VERSION} \(a newer lstmlm wrote it"),
        ({"version": 0}, r"has checkpoint format version 0; this lstmlm reads versions 1 to \d+ \(no lstmlm wrote such a version\)"),
        ({"version": "2"}, r"has checkpoint format version '2'"),
        ({"format": "something-else"}, r"is not an lstmlm checkpoint"),
        ({"trainer": None}, r"lacks its 'trainer' section"),
    ],
)
def test_newer_or_foreign_format_is_named(trained: Trainer, change: dict[str, Any], message: str) -> None:
    path = trained.store.path(LATEST)
    payload = {**load_checkpoint(path), **change}
    if change.get("trainer", 0) is None:
        del payload["trainer"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="is not an lstmlm checkpoint"):
        load_checkpoint(path)


def adopt(trainer: Trainer, other: Trainer) -> None:
    """Put `other`'s latest checkpoint into `trainer`'s run, as a careless copy would."""
    shutil.copy(other.store.path(LATEST), trainer.store.path(LATEST))


@pytest.mark.parametrize(
    ("theirs", "named"), [({"hidden": 24}, "hidden = 24; this run has hidden = 16"), ({"layers": 2}, "layers = 2; this run has layers = 1")]
)
def test_checkpoint_from_another_model_shape_is_named(make_trainer: MakeTrainer, theirs: dict[str, int], named: str) -> None:
    mine, other = make_trainer("mine", epochs=1), make_trainer("theirs", epochs=1, **theirs)
    list(mine.run()), list(other.run())
    adopt(mine, other)
    with pytest.raises(CheckpointError, match=rf"latest.pt holds a model with {named}"):
        make_trainer("mine", epochs=1).resume()


def test_checkpoint_from_another_vocabulary_is_named(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    """The same vocabulary size, so the shapes fit: only the vocabulary check can catch it."""
    shifted = tmp_path / "shifted.txt"
    shifted.write_text(synthetic_text().replace("a", "A"))
    mine, theirs = make_trainer("mine", epochs=1), make_trainer("theirs", corpus=shifted, epochs=1)
    assert len(mine.data.vocab) == len(theirs.data.vocab) and mine.data.vocab != theirs.data.vocab
    list(mine.run()), list(theirs.run())
    adopt(mine, theirs)
    expected = r"latest.pt was trained on another vocabulary \(26 tokens; this run has 26; only in the checkpoint: 'A'; only in this run: 'a'\)"
    with pytest.raises(CheckpointError, match=expected):
        make_trainer("mine", epochs=1).resume()


def test_weights_that_do_not_fit_their_config_name_the_tensor(trained: Trainer) -> None:
    path = trained.store.path(LATEST)
    payload = load_checkpoint(path)
    payload["model"]["W_hq"] = torch.zeros(3, 3)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"do not fit the model: size mismatch for W_hq: copying a param with shape torch.Size\(\[3, 3\]\)"):
        Trainer(trained.store, trained.cfg, trained.data, trained.device, "fp32").resume()


# ---- one training per run -----------------------------------------------------------------------


def test_a_second_training_is_refused_and_the_first_goes_on_undisturbed(make_trainer: MakeTrainer) -> None:
    straight = make_trainer("straight", epochs=2)
    list(straight.run())

    first = make_trainer("run", epochs=2)
    with first.store.locked():
        events = first.run()
        for event in events:  # the first training is mid-way through its first epoch
            if getattr(event, "step", 0) == 5:
                break
        with pytest.raises(CheckpointError, match=rf"run .*run is in use by another training \(pid {os.getpid()}\)"):
            with RunStore.open(first.store.root).locked():
                pass
        ended = [e.epoch for e in events if isinstance(e, EpochEnded)]
    assert ended == [1, 2]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, first.model.state_dict()[k])
    with RunStore.open(first.store.root).locked():  # released when the training ends
        pass


def test_creating_a_run_that_exists_is_refused(trained: Trainer) -> None:
    before = {p.name: p.read_bytes() for p in trained.store.root.iterdir()}
    with pytest.raises(CheckpointError, match="already exists: continue it with --resume or choose another --run"):
        RunStore.create(trained.store.root, trained.cfg, trained.data.vocab)
    assert {p.name: p.read_bytes() for p in trained.store.root.iterdir()} == before


# ---- planted symbolic links -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "config.json", "latest.pt"])
def test_a_symlink_planted_in_a_run_is_refused_and_its_target_untouched(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path, name: str) -> None:
    """A run's files are opened without following links: a link planted as the lock or the
    metrics would have had training truncate or append to whatever it points at."""
    assert cli(*tiny_train_args, "--run", "r").code == 0
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    planted = runs_dir / "r" / name
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)
    result = cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3")
    assert_one_error_line(result, f"refusing to open {planted}: it is a symbolic link", during_training=name == "metrics.jsonl")
    assert victim.read_text() == "keep me\n"
    assert planted.is_symlink()


def test_a_run_that_is_a_symlink_out_of_the_runs_directory_is_never_trained_into(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    """`lstmlm runs` calls a link in a run's place no run ("a run is a directory of its own"),
    `runs show` says it cannot be continued, serve neither lists nor serves it; yet
    `train --resume --run LINK` trained on in the directory it points at, outside the runs
    directory, and `train --run LINK` made a new run there. Both are refused, the target untouched."""
    assert cli(*tiny_train_args, "--run", "r").code == 0
    outside = tmp_path / "outside"
    (runs_dir / "r").rename(outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    (runs_dir / "link").symlink_to(outside)
    result = cli("train", "--resume", "--run", "link", "--runs-dir", runs_dir, "--epochs", "3")
    assert_one_error_line(result, f"refusing to open the run {runs_dir / 'link'}: it is a symbolic link, and a run is a directory of its own")
    empty = tmp_path / "empty"
    empty.mkdir()
    (runs_dir / "new").symlink_to(empty)
    result = cli(*tiny_train_args, "--run", "new")
    assert_one_error_line(result, f"refusing to open the run {runs_dir / 'new'}: it is a symbolic link, and a run is a directory of its own")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    assert not list(empty.iterdir())


def test_a_fifo_planted_as_the_lock_is_refused(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    lock = runs_dir / "r" / ".lock"
    lock.unlink(missing_ok=True)
    os.mkfifo(lock)
    assert_one_error_line(cli("train", "--resume", "--run", "r", "--runs-dir", runs_dir, "--epochs", "3"), f"refusing to open {lock}: it is not a regular file")


# ---- crafted archives ------------------------------------------------------------------------------


def test_a_compressed_checkpoint_is_refused_before_anything_is_inflated(trained: Trainer) -> None:
    """torch.save stores its entries; torch.load would inflate deflated ones too, so a few
    hundred KiB could demand gigabytes before any format check. This one carries 256 MiB of
    zeros in 256 KiB."""
    path = trained.store.path(LATEST)
    with zipfile.ZipFile(path) as original:
        entries = {info.filename: original.read(info) for info in original.infolist()}
    prefix = next(iter(entries)).split("/")[0]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as crafted:
        for name, data in entries.items():
            crafted.writestr(name, data)
        crafted.writestr(f"{prefix}/data/bomb", bytes(256 << 20))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(CheckpointError, match=rf"^refusing {path}: its entry '{prefix}/data.pkl' is compressed, and lstmlm checkpoints never are$"):
        load_checkpoint(path)


def test_an_entry_that_claims_more_than_the_archive_holds_is_refused(trained: Trainer) -> None:
    """The central directory says how long each entry is; a lie (here 2 GiB for a few bytes of
    weights) is caught before torch allocates for it."""
    path = trained.store.path(LATEST)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(info.filename for info in archive.infolist() if info.filename.endswith("/data/0"))
    header = data.index(b"PK\x01\x02")  # the first central-directory header
    while data[header + 46 : header + 46 + len(name)] != name.encode():  # walk to the entry's own header
        header = data.index(b"PK\x01\x02", header + 4)
    data[header + 20 : header + 28] = struct.pack("<II", 2**31 - 1, 2**31 - 1)  # compressed and stored size
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^refusing {path}: its entry '{name}' claims 2,147,483,647 bytes, more than the archive holds$"):
        load_checkpoint(path)


@pytest.mark.parametrize(("section", "value", "kind"), [("config", 5, "int"), ("vocab", ["a"], "list"), ("model", "weights", "str"), ("trainer", [], "list")])
def test_a_section_of_the_wrong_type_is_refused_by_name(trained: Trainer, section: str, value: Any, kind: str) -> None:
    path = trained.store.path(LATEST)
    torch.save({**load_checkpoint(path), section: value}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    expected = "dict" if section in ("model", "trainer") else "str"
    assert str(caught.value) == f"{path} is damaged: its '{section}' section is a {kind}, not a {expected}"


def test_generate_on_a_checkpoint_with_a_config_of_the_wrong_type_is_one_line(tiny_train_args: list[str], runs_dir: Path) -> None:
    assert cli(*tiny_train_args, "--run", "r").code == 0
    path = runs_dir / "r" / "latest.pt"
    torch.save({**load_checkpoint(path), "config": {"model": {"hidden": "sixteen"}}}, path)
    assert_one_error_line(cli("generate", "--run", "r", "--runs-dir", runs_dir), f"{path} is damaged: its 'config' section is a dict, not a str")


# ---- a run made before the cells ------------------------------------------------------------------

BEFORE_CELLS = Path(__file__).parent / "fixtures" / "lstm-before-cells"


@pytest.fixture
def run_before_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/fixtures/lstm-before-cells (README there): an LSTM run whose config has no `cell`,
    copied into a runs directory beside the corpus it was trained on."""
    shutil.copytree(BEFORE_CELLS / "old-lstm", tmp_path / "runs" / "old-lstm")
    shutil.copy(BEFORE_CELLS / "corpus.txt", tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)  # its config names the corpus relative to where it was trained
    return tmp_path / "runs"


def test_an_lstm_run_made_before_cells_loads_generates_and_resumes(run_before_cells: Path) -> None:
    stored = json.loads((run_before_cells / "old-lstm" / "config.json").read_text())
    assert "cell" not in stored["model"]  # the fixture is truly of the old format
    base = ["--runs-dir", str(run_before_cells), "--run", "old-lstm"]
    generated = cli("generate", *base, "--prefix", "the time", "--length", "30")
    assert generated.code == 0, generated.stderr
    assert generated.stdout.startswith("the time") and len(generated.stdout.rstrip("\n")) == len("the time") + 30
    inspected = cli("inspect", *base, "--text", "the time traveller")
    assert inspected.code == 0 and "layer 0 unit" in inspected.stdout  # the LSTM's default gate, the memory cell
    resumed = cli("train", *base, "--resume", "--epochs", "4", "--json")
    assert resumed.code == 0, resumed.stderr
    events = resumed.json()
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [4]
    assert json.loads((run_before_cells / "old-lstm" / "config.json").read_text())["model"]["cell"] == "lstm"


# ---- every older format ---------------------------------------------------------------------------

FORMATS = Path(__file__).parent / "fixtures" / "formats"

# What makes each fixture (tests/fixtures/formats/README.md) the format it stands for, as written.
OLD_MARKS: dict[str, Any] = {
    "first-release": lambda p, state, cfg: (
        "core.layers.0.W_xi" in p["model"] and "extra" in state and "prime" not in p and "val_tokens" not in cfg["train"] and "best_saved" not in state
    ),
    "before-cadences": lambda p, state, cfg: (
        "core.layers.0.W_xi" in p["model"] and "extra" not in state and "prime" in p and isinstance(cfg["train"]["checkpoint_every"], int)
    ),
    "version-1": lambda p, state, cfg: "core.layers.0.W_x" in p["model"] and "step" in state and "best_saved" in state and "cell" in cfg["model"],
}


@pytest.mark.parametrize("fixture", list(OLD_MARKS))
def test_every_older_format_migrates_generates_as_it_did_and_resumes(fixture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(FORMATS / fixture, runs / fixture)
    shutil.copy(FORMATS / "corpus.txt", tmp_path / "corpus.txt")
    monkeypatch.chdir(tmp_path)  # its config names the corpus relative to where it was trained
    latest = runs / fixture / f"{LATEST}.pt"
    written = torch.load(latest, weights_only=True)
    assert written["version"] == 1 and OLD_MARKS[fixture](written, written["trainer"]["state"], json.loads(written["config"]))

    migrated = load_checkpoint(latest)
    assert migrated["version"] == VERSION and "prime" in migrated
    assert set(migrated["trainer"]["state"]) <= {f.name for f in dataclasses.fields(Progress)}
    assert config_file.from_json(migrated["config"]).model.cell == "lstm"

    base = ["--runs-dir", str(runs), "--run", fixture]
    generated = cli("generate", *base, "--prefix", "the time", "--length", "30")
    assert generated.code == 0, generated.stderr
    assert generated.stdout == (FORMATS / f"{fixture}.generated.txt").read_text()  # the same model, as that lstmlm ran it
    resumed = cli("train", *base, "--resume", "--epochs", "13", "--json")
    assert resumed.code == 0, resumed.stderr
    assert [e["epoch"] for e in resumed.json() if e["event"] == "epoch"] == [13]
    assert load_checkpoint(latest)["trainer"]["state"]["epoch"] == 13 and torch.load(latest, weights_only=True)["version"] == VERSION
