"""`lstmlm runs`, `runs show`, `runs rm`: real runs made by `lstmlm train`, a real training holding
its lock, real signals, damaged runs, and no torch loaded."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lstmlm.runs import RunStore

from support.cli import LiveProcess, Result, assert_no_torch, assert_one_error_line, cli, strict_json
from support.tiny import CONFIGS, synthetic_text

TINY = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu", "--optimizer", "adam", "--lr", "0.02"]


# ---- real runs, made once -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A runs directory made by `lstmlm train`, read-only for the tests (they copy it): "raw"
    (scratch, raw text, 2 epochs), "bytes" (cudnn, bytes, 2 layers, an embedding) and "d2l"
    (the seed's config: no validation)."""
    root = tmp_path_factory.mktemp("made")
    corpus = root / "corpus.txt"
    corpus.write_text(synthetic_text(80), encoding="utf-8")
    runs = root / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LSTMLM_HOME", str(root / "home"))
        common = ["train", "--corpus", corpus, "--runs-dir", runs, "--epochs", "2"]
        for args in (
            [*TINY, "--normalize", "raw", "--run", "raw"],
            [*TINY, "--normalize", "bytes", "--run", "bytes", "--model", "cudnn", "--layers", "2", "--embedding", "8"],
            ["--config", CONFIGS / "d2l.toml", "--hidden", "16", "--run", "d2l"],
        ):
            result = cli(*common, *args)
            assert result.code == 0, result.stderr
    yield runs


@pytest.fixture
def runs_copy(made: Path, tmp_path: Path) -> Path:
    """A copy of the made runs this test may change (times kept: copy2)."""
    return Path(shutil.copytree(made, tmp_path / "runs", symlinks=True))


def listed(runs_dir: Path, *args: str) -> dict[str, dict[str, Any]]:
    """`lstmlm runs --json`, by name; each line strict JSON."""
    result = cli("runs", "--runs-dir", runs_dir, "--json", *args)
    assert result.code == 0, result.stderr
    records = result.json()
    assert len({r["name"] for r in records}) == len(records)
    return {r["name"]: r for r in records}


def on_disk(path: Path) -> int:
    """What `du` counts: the blocks of the directory and everything under it, links not followed
    (a file system that reports no blocks: the files' sizes)."""
    stats = [os.lstat(p) for p in [path, *path.rglob("*")]]
    return sum(st.st_blocks * 512 or st.st_size for st in stats)


# ---- what a row says ------------------------------------------------------------------------------


def test_each_run_is_a_row_with_what_its_files_and_checkpoints_hold(made: Path) -> None:
    from lstmlm.checkpoint import load_checkpoint

    runs = listed(made)
    assert set(runs) == {"raw", "bytes", "d2l"}
    for name, run in runs.items():
        latest = load_checkpoint(made / name / "latest.pt")
        state = latest["trainer"]["state"]
        assert (run["state"], run["why"], run["problems"], run["pid"]) == ("done", "completed", [], None)
        assert (run["epochs"], run["planned_epochs"]) == (2, 2)
        assert run["parameters"] == sum(t.numel() for t in latest["model"].values())  # counted from the config, no torch
        assert run["tokens"] == state["total_tokens"]
        assert run["corpus"] == "corpus.txt" and run["cell"] == "lstm" and run["checkpoint"] is True
        assert run["size_bytes"] == on_disk(made / name)
        if name == "d2l":  # the seed validates on nothing
            assert run["best_val_perplexity"] is None and run["best_val_bits"] is None
            continue
        best = load_checkpoint(made / name / "best.pt")["trainer"]["state"]["best_saved"]
        assert run["best_val_perplexity"] == pytest.approx(math.exp(best), rel=1e-9)
        assert run["best_val_bits"] == pytest.approx(math.log2(run["best_val_perplexity"]))
    assert (runs["raw"]["model"], runs["raw"]["layers"], runs["raw"]["hidden"], runs["raw"]["bits_per"]) == ("scratch", 1, 16, "character")
    assert (runs["bytes"]["model"], runs["bytes"]["layers"], runs["bytes"]["embedding"], runs["bytes"]["bits_per"]) == ("cudnn", 2, 8, "byte")
    assert runs["bytes"]["vocab_size"] == 256


def test_the_table_shows_every_run_and_its_figures(made: Path) -> None:
    runs = listed(made)
    result = cli("runs", "--runs-dir", made)
    assert result.code == 0 and "Traceback" not in result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:-1]}
    assert set(rows) == {"raw", "bytes", "d2l"}
    assert "lstm cudnn" in rows["bytes"] and "2×16" in rows["bytes"] and f"{runs['bytes']['best_val_bits']:.3f} bpb" in rows["bytes"]
    assert f"{runs['raw']['best_val_perplexity']:.3f}" in rows["raw"] and "bpc" in rows["raw"] and "2/2" in rows["raw"]
    assert all(row.rstrip().endswith("done") for row in rows.values())
    assert result.stdout.splitlines()[-1].startswith("3 run(s)")


def test_runs_sort_by_time_name_and_best(runs_copy: Path) -> None:
    for age, name in enumerate(["d2l", "raw", "bytes"]):  # d2l the newest
        for path in [runs_copy / name, *(runs_copy / name).iterdir()]:
            os.utime(path, (1e9 - age * 1000, 1e9 - age * 1000), follow_symlinks=False)
    order = lambda *args: [r["name"] for r in cli("runs", "--runs-dir", runs_copy, "--json", *args).json()]  # noqa: E731
    assert order() == order("--sort", "time") == ["d2l", "raw", "bytes"]
    assert order("--sort", "name") == ["bytes", "d2l", "raw"]
    runs = listed(runs_copy)
    by_bits = sorted(["raw", "bytes"], key=lambda n: runs[n]["best_val_bits"])
    assert order("--sort", "best") == [*by_bits, "d2l"]  # no validation: last
    assert_one_error_line(cli("runs", "--runs-dir", runs_copy, "--sort", "fastest"), "--sort must be one of best, time, name")


def test_an_empty_or_missing_runs_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "tune-study.db").write_bytes(b"not a run")  # files beside the runs are not runs
    result = cli("runs", "--runs-dir", tmp_path / "empty")
    assert result.code == 0 and result.stdout.startswith("no runs in")
    assert cli("runs", "--runs-dir", tmp_path / "empty", "--json").stdout == ""
    assert_one_error_line(cli("runs", "--runs-dir", tmp_path / "absent"), "no runs directory")


# ---- how a run ended --------------------------------------------------------------------------------


def test_a_run_made_before_the_end_was_recorded_is_done_when_all_its_epochs_are_logged(runs_copy: Path) -> None:
    record = json.loads((runs_copy / "raw" / "run.json").read_text())
    assert record["done"]["reason"] == "completed" and record["done"]["epochs"] == 2
    (runs_copy / "raw" / "run.json").write_text(json.dumps({"corpus_sha1": record["corpus_sha1"]}))
    (runs_copy / "bytes" / "run.json").unlink()  # older still: no run.json at all
    metrics = runs_copy / "d2l" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    (runs_copy / "d2l" / "run.json").write_text("{}")
    runs = listed(runs_copy)
    assert (runs["raw"]["state"], runs["bytes"]["state"]) == ("done", "done")
    assert runs["raw"]["tokens"] == record["done"]["tokens"]  # from the epochs' rates and times
    assert (runs["d2l"]["state"], runs["d2l"]["epochs"]) == ("interrupted", 1)


def test_a_checkpoint_newer_than_the_recorded_end_is_an_interrupted_training(runs_copy: Path) -> None:
    record = json.loads((runs_copy / "raw" / "run.json").read_text())
    later = record["done"]["at"] + 60
    os.utime(runs_copy / "raw" / "latest.pt", (later, later))  # as a later training's checkpoint, that then died
    run = listed(runs_copy)["raw"]
    assert (run["state"], run["why"]) == ("interrupted", "ended without saying so (killed?)")


def test_a_training_out_of_time_is_done_and_says_so(corpus_file: Path, runs_dir: Path) -> None:
    args = ["--corpus", corpus_file, "--normalize", "d2l", "--runs-dir", runs_dir, "--run", "timed", *TINY, "--epochs", "500", "--max-minutes", "0.01"]
    trained = cli("train", *args)
    assert trained.code == 0, trained.stderr
    run = listed(runs_dir)["timed"]
    assert (run["state"], run["why"], run["planned_epochs"]) == ("done", "time limit", 500)
    assert run["epochs"] < 500 and run["tokens"] > 0  # the tokens of the epoch it stopped in too
    assert "done (time limit)" in cli("runs", "--runs-dir", runs_dir).stdout


@pytest.fixture
def trainings(tmp_path: Path) -> Iterator[list[LiveProcess]]:
    started: list[LiveProcess] = []
    yield started
    for training in started:
        training.kill()


def live_args(corpus: Path, runs_dir: Path, run: str) -> list[str | Path]:
    return ["--corpus", corpus, "--normalize", "raw", "--runs-dir", runs_dir, "--run", run, *TINY, "--epochs", "500", "--checkpoint-every", "1e"]


def test_a_live_training_holds_its_run_until_a_sigint_leaves_it_interrupted_and_show_says_how_to_continue(
    trainings: list[LiveProcess], corpus_file: Path, runs_dir: Path, tmp_path: Path
) -> None:
    training = LiveProcess("train", *live_args(corpus_file, runs_dir, "live"), "--json")
    trainings.append(training)
    training.wait_until(lambda: any(e["event"] == "epoch" for e in training.events), "epoch")

    run = listed(runs_dir)["live"]
    assert (run["state"], run["pid"], run["why"]) == ("training", training.proc.pid, f"pid {training.proc.pid}")
    assert f"training (pid {training.proc.pid})" in cli("runs", "--runs-dir", runs_dir).stdout
    refused = cli("runs", "rm", "live", "--runs-dir", runs_dir, "--yes")
    assert_one_error_line(refused, f"run live is training now (pid {training.proc.pid})")
    assert (runs_dir / "live" / "config.json").is_file()
    assert "training now; once stopped, continue with: lstmlm train --resume --run live" in cli("runs", "show", "live", "--runs-dir", runs_dir).stdout

    assert training.stop(signal.SIGINT) == 130
    printed = next(line for line in training.stderr if "continue with:" in line).rstrip("\n")
    run = listed(runs_dir)["live"]
    assert (run["state"], run["why"], run["pid"]) == ("interrupted", "stopped, checkpoint saved", None)
    assert run["epochs"] == training.events[-1]["epochs"]  # the `done` event's
    shown = cli("runs", "show", "live", "--runs-dir", runs_dir)
    assert shown.code == 0 and "interrupted" in shown.stdout
    command = shown.stdout.splitlines()[-1].removeprefix("continue with: ")
    assert shlex.split(printed.split("continue with: ")[1])[: len(shlex.split(command))] == shlex.split(command)  # the same, less the options saved in the run

    resumed = cli(*shlex.split(command)[1:], "--epochs", str(run["epochs"] + 1))  # the command works as shown
    assert resumed.code == 0, resumed.stderr
    again = listed(runs_dir)["live"]
    assert (again["state"], again["epochs"], again["planned_epochs"]) == ("done", run["epochs"] + 1, run["epochs"] + 1)
    assert again["tokens"] > run["tokens"]


def test_a_killed_training_is_interrupted_without_a_word(trainings: list[LiveProcess], corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    training = LiveProcess("train", *live_args(corpus_file, runs_dir, "killed"), "--json")
    trainings.append(training)
    training.wait_until(lambda: (runs_dir / "killed" / "latest.pt").is_file() and listed(runs_dir)["killed"]["epochs"], "checkpoint")
    assert training.stop(signal.SIGKILL) == -signal.SIGKILL
    run = listed(runs_dir)["killed"]
    assert (run["state"], run["why"], run["checkpoint"]) == ("interrupted", "ended without saying so (killed?)", True)
    assert "done" not in json.loads((runs_dir / "killed" / "run.json").read_text())


def test_a_resumed_training_killed_before_its_first_checkpoint_is_interrupted_not_done(trainings: list[LiveProcess], runs_copy: Path) -> None:
    """run.json still records the first training's end; the resumed one logged epochs since."""
    assert listed(runs_copy)["raw"]["state"] == "done"
    training = LiveProcess("train", "--resume", "--run", "raw", "--runs-dir", runs_copy, "--epochs", "500", "--checkpoint-every", "0", "--json")
    trainings.append(training)
    training.wait_until(lambda: any(e["event"] == "epoch" and e["epoch"] >= 3 for e in training.events), "an epoch of the resumed training")
    assert training.stop(signal.SIGKILL) == -signal.SIGKILL
    run = listed(runs_copy)["raw"]
    assert (run["state"], run["why"], run["planned_epochs"]) == ("interrupted", "ended without saying so (killed?)", 500)
    shown = cli("runs", "show", "raw", "--runs-dir", runs_copy).stdout.splitlines()
    assert shown[-1] == f"continue with: lstmlm train --resume --run raw --runs-dir {runs_copy}"  # not "with more epochs"


# ---- damaged runs -------------------------------------------------------------------------------------


def _symlink_config(run: Path) -> None:
    outside = run.parent.parent / "outside-config.json"
    outside.write_text((run / "config.json").read_text())
    (run / "config.json").unlink()
    (run / "config.json").symlink_to(outside)


def _symlink_run(run: Path) -> None:
    outside = run.parent.parent / "outside-run"
    run.rename(outside)
    run.symlink_to(outside)


def _garbage_line(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0] + "garbage\n" + "".join(lines[1:]))


DAMAGE = {
    "config not JSON": (lambda run: (run / "config.json").write_text("{"), "config.json: stored config is not valid JSON"),
    "config missing": (lambda run: (run / "config.json").unlink(), "config.json is missing"),
    "config invalid": (lambda run: (run / "config.json").write_text('{"model": {"hidden": -1}}'), "config.json: [model] hidden must be at least 1"),
    "config a symlink": (_symlink_config, "config.json is a symbolic link"),
    "config a directory": (lambda run: ((run / "config.json").unlink(), (run / "config.json").mkdir()), "config.json is not a regular file"),
    "vocab missing": (lambda run: (run / "vocab.json").unlink(), "vocab.json is missing"),
    "vocab empty": (lambda run: (run / "vocab.json").write_text('{"tokens": []}'), "vocab.json lists no tokens"),
    "run.json not UTF-8": (lambda run: (run / "run.json").write_bytes(b"\xff\xfe"), "run.json is not UTF-8 text"),
    "run.json not JSON": (lambda run: (run / "run.json").write_text("[1, 2"), "run.json is not valid JSON"),
    "run.json a list": (lambda run: (run / "run.json").write_text("[1, 2]"), "run.json is not a JSON object"),
    "metrics garbage line": (_garbage_line, "metrics.jsonl line 2 is not a JSON record"),
    "metrics a FIFO": (lambda run: ((run / "metrics.jsonl").unlink(), os.mkfifo(run / "metrics.jsonl")), "metrics.jsonl is not a regular file"),
    "lock a symlink": (lambda run: (run / ".lock").symlink_to("/dev/null"), ".lock is a symbolic link"),
    "run a symlink": (_symlink_run, "a symbolic link to"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_is_one_row_saying_what_is_wrong(runs_copy: Path, damage: str) -> None:
    harm, says = DAMAGE[damage]
    (runs_copy / "raw" / ".lock").unlink(missing_ok=True)
    harm(runs_copy / "raw")
    runs = listed(runs_copy)
    assert (runs["raw"]["state"], runs["bytes"]["state"], runs["d2l"]["state"]) == ("unreadable", "done", "done")
    assert says in runs["raw"]["why"] and says in runs["raw"]["problems"][0]
    table = cli("runs", "--runs-dir", runs_copy)
    assert table.code == 0 and "Traceback" not in table.stdout + table.stderr
    assert "unreadable: " + says in next(line for line in table.stdout.splitlines() if line.startswith(" raw") or line.startswith("raw"))
    shown = cli("runs", "show", "raw", "--runs-dir", runs_copy)
    assert shown.code == 0 and "Traceback" not in shown.stdout + shown.stderr and says in shown.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a directory whatever its permissions")
def test_a_run_without_permission_to_read_is_one_row(runs_copy: Path) -> None:
    os.chmod(runs_copy / "raw", 0)
    try:
        run = listed(runs_copy)["raw"]
    finally:
        os.chmod(runs_copy / "raw", 0o755)
    assert run["state"] == "unreadable" and "Permission denied" in run["why"]


@contextlib.contextmanager
def kept_time(path: Path) -> Iterator[Any]:
    """`path` opened to append lines, its time kept: what it then holds is not a later training's
    (whose writes after the recorded end make the run interrupted)."""
    st = os.stat(path)
    with path.open("a") as f:
        yield f
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_directory_that_is_no_run_and_a_line_cut_by_a_crash(runs_copy: Path) -> None:
    (runs_copy / "stray").mkdir()
    with kept_time(runs_copy / "raw" / "metrics.jsonl") as f:
        f.write('{"epoch": 3, "train_perp')  # a crash mid-write: the line has no end
    with (runs_copy / "bytes" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "val_perplexity": NaN, "train_perplexity": Infinity}\n')  # not strict JSON: no figure
    runs = listed(runs_copy)
    assert (runs["stray"]["state"], runs["stray"]["why"]) == ("unreadable", "config.json is missing; vocab.json is missing")
    assert (runs["raw"]["state"], runs["raw"]["epochs"]) == ("done", 2)
    assert runs["bytes"]["best_val_perplexity"] is not None and runs["bytes"]["train_perplexity"] is None


def test_figures_no_training_can_log_are_no_figures(runs_copy: Path) -> None:
    huge = "1" + "0" * 400  # JSON's digits spell an integer no float holds
    before = listed(runs_copy)["raw"]
    with kept_time(runs_copy / "raw" / "metrics.jsonl") as f:
        f.write(f'{{"epoch": 2, "val_perplexity": 0.5, "train_perplexity": -3, "tokens_per_s": {huge}, "seconds": 1}}\n')
        f.write(f'{{"epoch": 2, "val_perplexity": {huge}, "tokens_per_s": -5, "seconds": 2}}\n')
    record = json.loads((runs_copy / "raw" / "run.json").read_text())
    record["done"].update(val_perplexity=-1, best_val_perplexity=1e-300, tokens=int(huge), seconds=int(huge))
    (runs_copy / "raw" / "run.json").write_text(json.dumps(record))
    os.utime(runs_copy / "raw" / "latest.pt", (0, 0))  # older than the end recorded: that end is the run's
    run = listed(runs_copy)["raw"]
    assert run["best_val_perplexity"] == before["best_val_perplexity"] and run["best_val_bits"] == before["best_val_bits"]
    assert (run["train_perplexity"], run["tokens"], run["seconds"]) == (None, None, None)
    for args in ([], ["show", "raw"]):
        result = cli("runs", *args, "--runs-dir", runs_copy)
        assert result.code == 0 and "error" not in result.stderr, result.stderr
        assert f"{before['best_val_perplexity']:.3f}" in result.stdout


@pytest.fixture
def far_times(runs_copy: Path) -> Iterator[Path]:
    """A copy of the made runs on a file system that keeps a file time 31 million years ahead
    (tmpfs does; ext4 clamps it to 2446): runs_copy where it does, else one under /dev/shm."""
    probe = runs_copy / "probe"
    probe.touch()
    os.utime(probe, (FAR, FAR))
    kept = os.stat(probe).st_mtime == FAR
    probe.unlink()
    if kept:
        yield runs_copy
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no file system here keeps a file time no date holds")
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        yield Path(shutil.copytree(runs_copy, Path(shm) / "runs", symlinks=True))


FAR = 1e15


def test_a_file_time_no_date_holds_is_a_question_mark_not_a_failure(far_times: Path) -> None:
    os.utime(far_times / "raw" / "metrics.jsonl", (FAR, FAR))
    runs = listed(far_times)
    assert runs["raw"]["changed"] is None and runs["bytes"]["changed"] is not None
    table = cli("runs", "--runs-dir", far_times)
    assert table.code == 0, table.stderr
    assert "  ?  " in next(line for line in table.stdout.splitlines() if line.lstrip().startswith("raw "))
    assert cli("runs", "show", "raw", "--runs-dir", far_times).code == 0


# ---- runs show ------------------------------------------------------------------------------------


def test_the_books_gru_is_told_from_torchs_in_the_listing_the_json_and_show(runs_copy: Path) -> None:
    """Two GRUs under one cell's name: the d2l form (the reset gate before the product) is named as such."""
    config = runs_copy / "raw" / "config.json"
    cfg = json.loads(config.read_text(encoding="utf-8"))
    cfg["model"].update(cell="gru", gru_form="d2l")
    config.write_text(json.dumps(cfg), encoding="utf-8")
    runs = listed(runs_copy)
    assert (runs["raw"]["cell"], runs["raw"]["form"]) == ("gru", "d2l")
    assert (runs["bytes"]["cell"], runs["bytes"]["form"]) == ("lstm", None)
    table = cli("runs", "--runs-dir", runs_copy)
    assert "gru (d2l) scratch" in table.stdout and "lstm cudnn" in table.stdout
    assert "gru (d2l) scratch" in cli("runs", "show", "raw", "--runs-dir", runs_copy).stdout


def test_show_prints_the_config_history_and_the_command(made: Path) -> None:
    run = listed(made)["raw"]
    shown = cli("runs", "show", "raw", "--runs-dir", made)
    assert shown.code == 0
    text = shown.stdout
    assert "optimizer" in text and "adam" in text and "hidden" in text
    assert f"trained 2/2 epochs, {run['tokens']:,} tokens" in text
    assert f"best validation perplexity {run['best_val_perplexity']:.3f} ({run['best_val_bits']:.3f} bpc) at epoch 2" in text
    assert text.splitlines()[-1] == f"continue with more epochs: lstmlm train --resume --run raw --runs-dir {made} --epochs N"
    as_json = strict_json(cli("runs", "show", "raw", "--runs-dir", made, "--json").stdout)
    assert as_json["config"]["train"]["optimizer"] == "adam" and as_json["continue"] == f"lstmlm train --resume --run raw --runs-dir {made}"
    assert_one_error_line(cli("runs", "show", "nope", "--runs-dir", made), "no run nope in")
    assert_one_error_line(cli("runs", "show", "../raw", "--runs-dir", made), "--run must be a plain name")


def test_the_best_validation_is_said_at_the_epoch_it_was_made_in_even_within_one(runs_copy: Path) -> None:
    """--eval-every in steps: the best validation a line of its own at 1.5; epoch 2's record
    carries a later, worse one. Its figure (run.json's best) was said 'at epoch 2'."""
    run = runs_copy / "raw"
    first, second = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    best = first["val_perplexity"] * 0.9
    within = {"epoch": 1.5, "global_step": first["global_step"] + 1, "train_perplexity": math.e, "val_perplexity": best, "lr": 0.02}
    second.update(val_perplexity=best * 1.1, val_bpc=math.log2(best * 1.1))
    with kept_time(run / "metrics.jsonl") as f:
        f.truncate(0)
        f.write("".join(json.dumps(r) + "\n" for r in (first, within, second)))
    record = json.loads((run / "run.json").read_text())
    record["done"].update(best_val_perplexity=best, val_perplexity=best * 1.1)
    (run / "run.json").write_text(json.dumps(record))
    listed_run = listed(runs_copy)["raw"]
    assert (listed_run["state"], listed_run["best_val_perplexity"], listed_run["best_epoch"]) == ("done", best, 1.5)
    assert listed_run["last_val_perplexity"] == best * 1.1
    assert f"best validation perplexity {best:.3f} ({math.log2(best):.3f} bpc) at epoch 1.5\n" in cli("runs", "show", "raw", "--runs-dir", runs_copy).stdout

    killed = runs_copy / "bytes"  # killed halfway into its first epoch, after a validation: no epoch, no end recorded
    (killed / "metrics.jsonl").write_text(json.dumps({**within, "epoch": 0.5}) + "\n")
    (killed / "run.json").write_text(json.dumps({"corpus_sha1": record["corpus_sha1"]}))
    listed_run = listed(runs_copy)["bytes"]
    assert (listed_run["state"], listed_run["epochs"], listed_run["best_val_perplexity"], listed_run["best_epoch"]) == ("interrupted", 0, best, 0.5)


def test_show_lists_each_config_key_once(made: Path) -> None:
    words = cli("runs", "show", "bytes", "--runs-dir", made).stdout.split()
    assert (words.count("cell"), words.count("hidden"), words.count("epochs")) == (1, 1, 1)
    assert words[words.index("cell") + 1] == "lstm"


def test_show_on_a_training_without_a_checkpoint_yet_says_so_and_offers_nothing(runs_copy: Path) -> None:
    run = runs_copy / "raw"
    for checkpoint in run.glob("*.pt"):  # as a training is before its first checkpoint
        checkpoint.unlink()
    with RunStore(run).locked():  # held as a training holds it, with this process's pid
        shown = cli("runs", "show", "raw", "--runs-dir", runs_copy)
        as_json = strict_json(cli("runs", "show", "raw", "--runs-dir", runs_copy, "--json").stdout)
    assert shown.code == 0
    assert shown.stdout.splitlines()[0].startswith(f"run raw  training (pid {os.getpid()})")
    assert shown.stdout.splitlines()[-1] == "training now, with no checkpoint yet"
    assert (as_json["state"], as_json["checkpoint"], as_json["continue"]) == ("training", False, None)


@pytest.mark.parametrize("name", ["two words", "-dash", "a$(touch pwned)"])
def test_show_offers_a_command_that_deletes_that_run_and_no_other(runs_copy: Path, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "runs" here, the default runs directory, holds a run of the same name
    monkeypatch.delenv("LSTMLM_RUNS", raising=False)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs_copy / "d2l", tmp_path / "runs" / name, symlinks=True)
    shutil.copytree(runs_copy / "d2l", elsewhere / name, symlinks=True)
    for checkpoint in (elsewhere / name).glob("*.pt"):  # stopped before its first checkpoint: nothing to continue
        checkpoint.unlink()
    shown = cli("runs", "show", "--runs-dir", elsewhere, "--", name)
    assert shown.code == 0, shown.stderr
    command = shlex.split(shown.stdout.splitlines()[-1].split("delete it with: ", 1)[1].rstrip(")"))
    assert command[:3] == ["lstmlm", "runs", "rm"]
    assert cli(*command[1:3], "--yes", *command[3:]).code == 0
    assert not (elsewhere / name).exists() and (tmp_path / "runs" / name).is_dir() and not (tmp_path / "pwned").exists()


# ---- runs rm ------------------------------------------------------------------------------------------


def rm(runs_dir: Path, *args: str, answer: str | None = None) -> Result:
    from typer.testing import CliRunner

    from lstmlm.cli import app

    result = CliRunner().invoke(app, ["runs", "rm", *args, "--runs-dir", str(runs_dir)], input=answer)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return Result(result.exit_code, result.stdout, result.stderr)


def test_rm_asks_first_and_deletes_only_on_yes(runs_copy: Path) -> None:
    declined = rm(runs_copy, "raw", answer="n\n")
    assert declined.code == 0 and "delete raw (" in declined.stderr and "nothing deleted" in declined.stderr
    assert (runs_copy / "raw").is_dir()
    unanswered = rm(runs_copy, "raw", answer="")  # stdin closed: no answer
    assert unanswered.code == 1 and unanswered.stderr.splitlines()[0].startswith("delete raw (")
    assert unanswered.stderr.splitlines()[1:] == ["error: nothing deleted: no answer to the question (give --yes to delete without asking)"]
    assert (runs_copy / "raw").is_dir()
    agreed = rm(runs_copy, "raw", answer="y\n")
    assert agreed.code == 0 and agreed.stdout.endswith("deleted raw\n") and not (runs_copy / "raw").exists()  # (the runner echoes the answer)
    assert set(listed(runs_copy)) == {"bytes", "d2l"}


def test_rm_yes_deletes_several_and_nothing_when_one_is_not_there(runs_copy: Path) -> None:
    assert_one_error_line(rm(runs_copy, "bytes", "nope", "--yes"), "no run nope in")
    assert (runs_copy / "bytes").is_dir()
    assert_one_error_line(rm(runs_copy, "../bytes", "--yes"), "--run must be a plain name")
    done = rm(runs_copy, "bytes", "d2l", "--yes")
    assert done.code == 0 and done.stdout.splitlines() == ["deleted bytes", "deleted d2l"]
    assert sorted(p.name for p in runs_copy.iterdir()) == ["raw"]


def test_rm_never_follows_a_symbolic_link_out_of_the_runs_directory(runs_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "keep.txt").write_text("mine")
    (outside / "dir" / "keep.txt").write_text("mine too")
    (runs_copy / "raw" / "linked.txt").symlink_to(outside / "keep.txt")
    (runs_copy / "raw" / "linked-dir").symlink_to(outside / "dir")
    (runs_copy / "elsewhere").symlink_to(outside)  # a link in a run's place
    assert rm(runs_copy, "raw", "elsewhere", "--yes").code == 0
    assert not os.path.lexists(runs_copy / "raw") and not os.path.lexists(runs_copy / "elsewhere")
    assert (outside / "keep.txt").read_text() == "mine" and (outside / "dir" / "keep.txt").read_text() == "mine too"


# ---- no torch -----------------------------------------------------------------------------------------


def test_runs_dir_given_before_the_subcommand_is_the_one_shown_and_removed_from(runs_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = Path(shutil.copytree(runs_copy, tmp_path / "other", symlinks=True))
    monkeypatch.chdir(tmp_path)  # the default runs directory, "runs", is runs_copy
    monkeypatch.delenv("LSTMLM_RUNS", raising=False)
    shown = cli("runs", "--runs-dir", other, "--json", "show", "raw")
    assert shown.code == 0 and json.loads(shown.stdout)["path"] == str(other / "raw")
    removed = cli("runs", "--runs-dir", other, "rm", "raw", "--yes")
    assert removed.code == 0, removed.stderr
    assert not (other / "raw").exists() and (runs_copy / "raw").is_dir()
    assert cli("runs", "--runs-dir", other, "show", "bytes", "--runs-dir", runs_copy).stdout.startswith(f"run bytes  done  {runs_copy}")


@pytest.mark.parametrize("command", [["runs"], ["runs", "--json", "--sort", "best"], ["runs", "show", "raw"], ["runs", "rm", "d2l", "--yes"]])
def test_runs_never_imports_torch(runs_copy: Path, command: list[str]) -> None:
    done = assert_no_torch(*command, "--runs-dir", runs_copy)
    assert ("deleted d2l" if "rm" in command else "raw") in done.stdout
