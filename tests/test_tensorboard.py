"""`--tensorboard DIR` (lstmlm/tensorboard.py): the event files of real trainings, read back with
TensorBoard's own reader (EventAccumulator) and checked against the run's metrics.jsonl — a new
run, a run killed after its last checkpoint and resumed, tune's trials, torchrun's rank 0 —
and the hint when the extra is missing."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lstmlm.step as step_mod
import lstmlm.train as train_mod
from lstmlm import baselines
from lstmlm import training as trainings
from lstmlm.events import EpochEnded, Sampled

from support.cli import assert_one_error_line, cli, lstmlm_process
from support.faults import fill

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install '.[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

TINY = {"hidden": 16, "batch_size": 8, "num_steps": 10, "device": "cpu", "normalize": "raw"}


def read(directory: Path) -> EventAccumulator:
    board = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every point
    board.Reload()
    return board


def points(board: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in board.Scalars(tag)]


def metrics(runs: Path, run: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]


def train(runs: Path, run: str, corpus: Path, board: Path, resume: bool = False, stop_after_epoch: int | None = None, **overrides: Any) -> None:
    """A training as `lstmlm train` runs it (training.plan → training.start → run);
    with `stop_after_epoch`, the events stop being read once that epoch has ended, as if the
    process were killed there: nothing after it runs, no checkpoint is written."""
    given = {**({} if resume else {**TINY, "corpus": str(corpus), "tensorboard": str(board)}), **overrides}
    plan = trainings.plan(runs, run, given, resume=resume, default_recipe=False)
    with trainings.start(plan) as training:
        events = training.run()
        for event in events:
            if isinstance(event, EpochEnded) and event.epoch == stop_after_epoch:
                events.close()  # type: ignore[attr-defined]
                return


def check_against_metrics(board: EventAccumulator, records: list[dict[str, Any]]) -> None:
    """Every epoch of metrics.jsonl is one point at its global step, nothing else (no step twice)."""
    steps = [r["global_step"] for r in records]
    for tag, key in (("perplexity/train", "train_perplexity"), ("perplexity/val", "val_perplexity"), ("bpc/val", "val_bpc"),
                     ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s"), ("train/grad_norm", "grad_norm"), ("loss/train", "train_loss")):  # fmt: skip
        logged = points(board, tag)
        assert [s for s, _ in logged] == steps, tag
        assert [v for _, v in logged] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    assert [v for _, v in points(board, "loss/val")] == pytest.approx([math.log(r["val_perplexity"]) for r in records], rel=1e-6)
    assert [v for _, v in points(board, "bpc/train")] == pytest.approx([math.log2(r["train_perplexity"]) for r in records], rel=1e-6)


def test_a_run_logs_its_metrics_baselines_samples_and_config(corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    board_dir = tmp_path / "tb"
    train(runs_dir, "r", corpus_file, board_dir, epochs=3, sample_every="1e")
    records = metrics(runs_dir, "r")
    assert len(records) == 3 and all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in records)
    board = read(board_dir / "r")
    check_against_metrics(board, records)

    # the baselines: one flat line each, under the validation curve's tag, at its steps
    kept = baselines.read(runs_dir / "r")
    assert kept is not None
    for name in ("uniform", "unigram", "bigram"):
        line = points(read(board_dir / "r" / "baselines" / name), "bpc/val")
        assert [s for s, _ in line] == [r["global_step"] for r in records]
        assert [v for _, v in line] == pytest.approx([getattr(kept, name)] * len(records), rel=1e-6)

    # the samples: one text at each epoch's end (samples at 1e; the last at the stop)
    texts = board.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [r["global_step"] for r in records]
    assert texts[-1].tensor_proto.string_val[0].decode().startswith("    ")  # code blocks: shown verbatim

    # the config as hyperparameters, the validation loss and bits its metrics
    content = board.PluginTagToContent("hparams")
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["loss/val", "bpc/val"]
    assert {h.name for h in experiment.hparam_infos} >= {"hidden", "lr", "optimizer", "corpus", "epochs"}
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["hidden"].number_value == 16 and start.hparams["optimizer"].string_value == "sgd"
    assert start.start_time_secs > 0 and "tensorboard" not in start.hparams
    assert "_hparams_/session_end_info" in content


def test_a_bytes_run_logs_bits_per_byte_and_its_hparams_metrics_are_those_it_logs(corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    """The HParams view's metrics name scalars of the run: a bytes run's bits are bpb/val, and
    a metric 'bpc/val' was a column no run of it ever filled."""
    board_dir = tmp_path / "tb"
    train(runs_dir, "b", corpus_file, board_dir, epochs=1, normalize="bytes")
    board = read(board_dir / "b")
    assert {"bpb/val", "bpb/train"} <= set(board.Tags()["scalars"]) and not any(t.startswith("bpc/") for t in board.Tags()["scalars"])
    assert [s for s, _ in points(read(board_dir / "b" / "baselines" / "unigram"), "bpb/val")] == [metrics(runs_dir, "b")[0]["global_step"]]
    experiment = HParamsPluginData.FromString(board.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["loss/val", "bpb/val"]


def test_a_run_killed_after_its_checkpoint_and_resumed_continues_the_same_curves(corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    """Checkpoints every 2 epochs; killed right after epoch 3 ended (its points logged, no
    checkpoint for it): the resume trains epoch 3 again from epoch 2's checkpoint, and then 4.
    TensorBoard shows each epoch once, at the right step, with the values metrics.jsonl has."""
    board_dir = tmp_path / "tb"
    train(runs_dir, "r", corpus_file, board_dir, epochs=3, checkpoint_every="2e", sample_every="1e", stop_after_epoch=3)
    killed = read(board_dir / "r")
    assert len(points(killed, "perplexity/train")) == 3  # epoch 3 was logged before the kill
    assert len(metrics(runs_dir, "r")) == 3

    train(runs_dir, "r", corpus_file, board_dir, resume=True, epochs=4)
    records = metrics(runs_dir, "r")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    board = read(board_dir / "r")
    check_against_metrics(board, records)
    assert [t.step for t in board.Tensors("samples/text_summary")] == [r["global_step"] for r in records]
    line = points(read(board_dir / "r" / "baselines" / "bigram"), "bpc/val")
    assert [s for s, _ in line] == [r["global_step"] for r in records]
    assert len(list((board_dir / "r").glob("events.out.tfevents.*"))) == 2  # one file a session
    assert len(HParamsPluginData.FromString(board.PluginTagToContent("hparams")["_hparams_/experiment"]).experiment.hparam_infos) > 0


def test_a_resume_can_start_logging_and_a_new_run_never_shows_an_old_ones_points(corpus_file: Path, runs_dir: Path, tmp_path: Path) -> None:
    board_dir = tmp_path / "tb"
    plan = trainings.plan(runs_dir, "r", {**TINY, "corpus": str(corpus_file), "epochs": 2}, default_recipe=False)
    with trainings.start(plan) as training:
        list(training.run())
    assert not board_dir.exists()
    train(runs_dir, "r", corpus_file, board_dir, resume=True, epochs=3, tensorboard=str(board_dir))  # a resume may turn it on
    records = metrics(runs_dir, "r")
    board = read(board_dir / "r")
    assert points(board, "perplexity/train") == [(records[2]["global_step"], pytest.approx(records[2]["train_perplexity"]))]
    assert "_hparams_/session_start_info" in board.PluginTagToContent("hparams")  # the first file in the directory has them

    # a new run of the same name (the old one deleted) in the same directory: the old points are purged
    import shutil

    shutil.rmtree(runs_dir / "r")
    train(runs_dir, "r", corpus_file, board_dir, epochs=1)
    board = read(board_dir / "r")
    assert [s for s, _ in points(board, "perplexity/train")] == [metrics(runs_dir, "r")[0]["global_step"]]


def test_tune_writes_each_trial_into_a_subdirectory(corpus_file: Path, runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("optuna", reason="the tune extra is not installed (pip install '.[tune]')")
    now = [1000.0]  # a clock that moves 0.02 s a step: every trial trains the same steps on any machine
    real_step = step_mod.train_step

    def step(*args: Any, **kwargs: Any) -> Any:
        now[0] += 0.02
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_mod, "train_step", step)
    monkeypatch.setattr(trainings, "Trainer", functools.partial(train_mod.Trainer, clock=lambda: now[0]))
    board_dir = tmp_path / "tb"
    result = cli(
        "tune", "--corpus", corpus_file, "--normalize", "raw", "--minutes", "0.01", "--runs-dir", runs_dir, "--study", "s", "--trials", "2",
        "--hidden", "16", "--embedding", "8", "--batch-size", "8", "--num-steps", "10", "--device", "cpu", "--tensorboard", board_dir,
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in board_dir.iterdir()) == ["s-trial-0", "s-trial-1"]
    for trial in ("s-trial-0", "s-trial-1"):
        board = read(board_dir / trial)
        assert len(points(board, "loss/val")) >= 6  # its validations
        start = HParamsPluginData.FromString(board.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["hidden"].number_value == 16  # each trial its own hyperparameters, compared in the HParams view
    assert f"tensorboard = {json.dumps(str(board_dir))}" in (runs_dir / "s-best.toml").read_text()  # its training logs beside them


def test_under_torchrun_only_rank_zero_writes(corpus_file: Path, tmp_path: Path) -> None:
    board_dir = tmp_path / "tb"
    train_args = ["-m", "lstmlm", "train", "--corpus", str(corpus_file), "--normalize", "raw", "--runs-dir", str(tmp_path / "runs"), "--name", "d",
                  "--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--epochs", "2", "--json", "--tensorboard", str(board_dir)]  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *launcher, *train_args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = list(board_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 4  # the run's and its three baselines', all from one process
    assert len({f.name.split(".")[-2] for f in files}) == 1  # ...pid.N: one writer
    check_against_metrics(read(board_dir / "d"), metrics(tmp_path / "runs", "d"))


def test_without_tensorboard_installed_it_says_how_to_install_it(
    tiny_train_args: list[str], runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    result = cli(*tiny_train_args, "--tensorboard", tmp_path / "tb", "--run", "r")
    assert_one_error_line(result, "pip install 'lstmlm[tensorboard]'")
    assert not (runs_dir / "r").exists() and not (tmp_path / "tb").exists()  # refused before anything was made


def test_logs_that_cannot_go_in_their_place_are_refused_before_the_run_is_made(tiny_train_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    """DIR/RUN a file: refused in one line, and no run of that name is left to block it."""
    board = tmp_path / "tb"
    board.mkdir()
    (board / "r").write_text("not a directory", encoding="utf-8")
    result = cli(*tiny_train_args, "--tensorboard", board, "--run", "r")
    assert_one_error_line(result, f"cannot write TensorBoard logs in {board / 'r'}: it is not a directory")
    assert not (runs_dir / "r").exists()


def test_logs_on_a_full_disk_are_one_line_and_room_again_logs(small_disk: Path, tiny_train_args: list[str]) -> None:
    """A real full filesystem under DIR (runs elsewhere), full at the start and full while
    training: TensorBoard's writer thread failed with a traceback of its own ("Exception in
    thread"), and the line said only "No space left on device"; now one line naming the logs,
    and with room again the next training logs there."""
    board = small_disk / "tb"
    for run, leave in (("at-the-start", 0), ("while-training", 4096)):
        filler = fill(small_disk, leave=leave)
        result = lstmlm_process(*tiny_train_args, "--epochs", "40", "--tensorboard", board, "--run", run)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot write TensorBoard logs in {board / run}") and last.endswith("No space left on device"), result.stderr
        filler.unlink()
    again = lstmlm_process(*tiny_train_args, "--tensorboard", board, "--run", "r2")
    assert again.returncode == 0, again.stderr
    assert read(board / "r2").Scalars("perplexity/train")


def test_samples_go_to_the_log_as_one_text_a_sampling(tmp_path: Path) -> None:
    from lstmlm.config import Config
    from lstmlm.events import Evaluated, Finished
    from lstmlm.tensorboard import logged

    finished = Finished("completed", 2.0, 2.0, 1.0, "cpu", "scratch", "r", 1, 3, {})
    events = [Evaluated(1, 5, 2.0, 1.0, True, val_loss=math.log(2.0)), Sampled(1, "a", "ab\ncd"), Sampled(1, "b", "ba"), finished]
    assert list(logged(iter(events), tmp_path / "r", Config(), 0)) == events  # passed on as they came
    (text,) = read(tmp_path / "r").Tensors("samples/text_summary")
    assert text.step == 5 and text.tensor_proto.string_val[0].decode() == "    ab\n    cd\n\n    ba"
