"""`lstmlm tune`: trials that are real trainings (tiny ones, on a clock that advances only when a
step runs, so every trial trains the same number of steps on any machine), a SQLite study under
a temporary runs directory, its interruption and resumption, pruning through the trainer's stop
path, the best config that `lstmlm train --config` takes, and the errors in one line."""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import lstmlm.step as step_mod
import lstmlm.train as train_mod
import lstmlm.training as training_mod
from lstmlm import checkpoint, config_file, tune
from lstmlm.errors import ConfigError
from lstmlm.runs import LATEST, RunStore

from support.cli import Result, assert_one_error_line, cli, lstmlm_process

optuna = pytest.importorskip("optuna", reason="the tune extra is not installed (pip install '.[tune]')")

MINUTES = 0.01  # 0.6 s of the fake clock: STEPS steps a trial
PER_STEP = 0.02
STEPS = round(MINUTES * 60 / PER_STEP)
TINY = ["--hidden", "16", "--layers", "1", "--embedding", "8", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]


@pytest.fixture(autouse=True)
def step_clock(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The trainer's clock advances PER_STEP seconds a training step and stands still otherwise;
    the list counts the steps taken (by every trial and training of the test)."""
    now, steps = [1000.0], [0]
    real_step = step_mod.train_step

    def step(*args: Any, **kwargs: Any) -> Any:
        now[0] += PER_STEP
        steps[0] += 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_mod, "train_step", step)
    monkeypatch.setattr(training_mod, "Trainer", functools.partial(train_mod.Trainer, clock=lambda: now[0]))  # every trial's trainer on this clock
    return steps


@pytest.fixture
def tune_args(corpus_file: Path, runs_dir: Path) -> list[str]:
    return ["tune", "--corpus", str(corpus_file), "--normalize", "raw", "--minutes", str(MINUTES), "--runs-dir", str(runs_dir), "--study", "s", *TINY]


def storage_of(runs_dir: Path) -> str:
    return f"sqlite:///{runs_dir / 'tune-s.db'}"


def load(runs_dir: Path) -> Any:
    return optuna.load_study(study_name="s", storage=storage_of(runs_dir))


def states(runs_dir: Path) -> list[str]:
    return [t.state.name for t in load(runs_dir).get_trials()]


def test_two_trials_end_to_end_and_the_best_config_trains_unchanged(tune_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    result = cli(*tune_args, "--trials", "2")
    assert result.code == 0, result.stderr
    assert result.stderr == ""  # the trial's bar is for a terminal: in a pipe or a log, not even a blank line
    study = load(runs_dir)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # the median pruner waits for 5
    for t in trials:
        assert t.user_attrs["run"] == f"s-trial-{t.number}"
        run = RunStore.open(runs_dir / f"s-trial-{t.number}")  # each trial's run is kept
        assert run.has_checkpoint(LATEST) and run.has_checkpoint("best")
        assert run.config.train.max_minutes == MINUTES and str(run.config.train.eval_every) == f"{MINUTES / tune.VALIDATIONS:g}m"
        assert sorted(t.intermediate_values) == list(range(1, len(t.intermediate_values) + 1)) and len(t.intermediate_values) >= 6
        assert t.value == min(t.intermediate_values.values())  # its value: the best validation
        assert (run.config.model.hidden, run.config.data.batch_size) == (16, 8)  # the options given are fixed
        assert {"lr", "optimizer", "dropout"} <= set(t.params) and "hidden" not in t.params  # the rest is searched
    lines = result.stdout.splitlines()
    assert lines[0].startswith("study s in sqlite:///") and "searching lr, optimizer" in lines[0]
    assert lines[1].split()[:4] == ["trial", "state", "val", "nats"]
    assert [line.split()[:2] for line in lines[2:] if line.split()[:1] in (["0"], ["1"])] == [["0", "complete"], ["1", "complete"]]
    best = study.best_trial
    assert f"best: trial {best.number}, {best.value:.4f} nats" in result.stdout

    written = runs_dir / "s-best.toml"
    cfg = config_file.load(written)
    assert cfg.to_dict() == best.user_attrs["config"]
    assert cfg.train.lr == best.params["lr"] and cfg.train.max_minutes == MINUTES
    assert (str(cfg.train.eval_every), str(cfg.train.checkpoint_every), cfg.train.val_tokens) == ("1e,10m", "10m", 250_000)  # train's own cadences
    trained = cli("train", "--config", written, "--runs-dir", tmp_path / "again", "--run", "best", "--json")
    assert trained.code == 0, trained.stderr
    assert trained.json()[-1]["reason"] == "time_limit"


def test_json_lines_a_trial_each_and_done(tune_args: list[str]) -> None:
    result = cli(*tune_args, "--trials", "1", "--json")
    assert result.code == 0, result.stderr
    trial, done = result.json()
    assert trial["event"] == "trial" and trial["state"] == "complete" and trial["settings"]["hidden"] == 16
    assert trial["val_bits"] == pytest.approx(trial["val_loss"] / 0.6931471805599453)
    assert done["event"] == "done" and done["states"]["complete"] == 1 and done["best"]["number"] == 0


@pytest.mark.parametrize("how", ["sigint", "second-ctrl-c"])
def test_an_interrupted_study_resumes_with_the_command_it_prints(tune_args: list[str], runs_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A Ctrl-C (the stop flag: the trainer stops at the batch's end) or a second one (a
    KeyboardInterrupt inside the step) during the second trial: that trial is failed, not left
    running; the command printed adds trials to the same study."""
    steps, stepping = [0], step_mod.train_step

    def interrupted_step(*args: Any, **kwargs: Any) -> Any:
        steps[0] += 1
        if steps[0] == STEPS + 5:  # five steps into the second trial
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return stepping(*args, **kwargs)

    monkeypatch.setattr(step_mod, "train_step", interrupted_step)
    result = cli(*tune_args, "--trials", "3")
    assert result.code == 130, result.stderr
    assert states(runs_dir) == ["COMPLETE", "FAIL"]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: the running trial is marked failed; continue the study with: lstmlm tune --study s ")
    command = shlex.split(last.split("continue the study with: ")[1])
    assert command[:2] == ["lstmlm", "tune"]

    monkeypatch.setattr(step_mod, "train_step", stepping)
    again = cli(*command[1:], "--trials", "1")  # the last --trials wins
    assert again.code == 0, again.stderr
    assert states(runs_dir) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert "study s in" in again.stdout and "(2 trials so far)" in again.stdout


@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_a_trial_whose_curve_is_worse_is_pruned_through_the_trainers_stop_path(tune_args: list[str], runs_dir: Path, pruner: str) -> None:
    """Two trials, their learning rates given (enqueued): 3e-2 learns, 3e-4 barely moves. The
    second is worse at the pruners' first checkpoint (validation 2) and stopped there."""
    runs_dir.mkdir(parents=True)
    study = optuna.create_study(study_name="s", storage=storage_of(runs_dir), direction="minimize")
    study.enqueue_trial({"lr": 3e-2})
    study.enqueue_trial({"lr": 3e-4})
    fixed = ["--optimizer", "adam", "--weight-decay", "0", "--schedule", "constant", "--warmup-steps", "0", "--dropout", "0"]
    result = cli(*tune_args, *fixed, "--trials", "2", "--pruner", pruner, "--startup-trials", "1", "--json")
    assert result.code == 0, result.stderr
    good, bad = load(runs_dir).get_trials()
    assert (good.state.name, bad.state.name) == ("COMPLETE", "PRUNED")
    assert bad.intermediate_values[2] > good.intermediate_values[2]
    assert max(bad.intermediate_values) == 2  # no validation after the pruner spoke
    ended = [e for e in result.json() if e["event"] == "trial"]
    assert ended[1]["state"] == "pruned" and ended[1]["reason"] == f"at validation 2 of {tune.VALIDATIONS}"
    stepped = [checkpoint.load(RunStore.open(runs_dir / f"s-trial-{n}"), LATEST)["trainer"]["state"]["global_step"] for n in (0, 1)]
    assert stepped[1] < stepped[0] / 2  # the training itself stopped, its checkpoint saved where it stood


def test_a_study_joined_with_other_settings_is_refused(tune_args: list[str]) -> None:
    assert cli(*tune_args, "--trials", "0").code == 0  # made, its settings recorded; no trial run
    minutes = [a if a != str(MINUTES) else "0.02" for a in tune_args]
    assert_one_error_line(cli(*minutes, "--trials", "0"), f"study s trains each trial for {MINUTES} minutes, not 0.02")
    assert_one_error_line(cli(*tune_args, "--trials", "0", "--layers", "2"), "study s was made with layers = 1, this has 2")
    assert cli(*tune_args, "--trials", "0", "--device", "auto").code == 0  # what each machine computes on may differ


def test_without_a_completed_trial_there_is_no_best_config(tune_args: list[str], runs_dir: Path) -> None:
    result = cli(*tune_args, "--trials", "0")
    assert result.code == 0 and "no trial has completed yet" in result.stdout
    assert not (runs_dir / "s-best.toml").exists()


def test_an_output_given_is_refused_before_any_trial_unless_forced(tune_args: list[str], runs_dir: Path, tmp_path: Path) -> None:
    """tune --output follows export -o's rule (atomic.write_output), checked before the first
    trial: a study of hours does not end in a refusal. The default file is the study's own."""
    mine = tmp_path / "best.toml"
    mine.write_text("# my own recipe\n", encoding="utf-8")
    assert_one_error_line(cli(*tune_args, "--trials", "1", "--output", mine), f"refusing to replace {mine}: it exists (--force replaces it)")
    assert mine.read_text(encoding="utf-8") == "# my own recipe\n" and states(runs_dir) == []  # no trial ran
    result = cli(*tune_args, "--trials", "1", "--output", mine, "--force")
    assert result.code == 0, result.stderr
    assert config_file.load(mine).to_dict() == load(runs_dir).best_trial.user_attrs["config"]
    run = runs_dir / "s-trial-0"
    result = cli(*tune_args, "--trials", "1", "--output", run / "best.toml", "--force")
    assert_one_error_line(result, f"refusing to write {run / 'best.toml'}: {run} is a run's directory")
    assert states(runs_dir) == ["COMPLETE"]
    assert cli(*tune_args, "--trials", "0").code == 0 and cli(*tune_args, "--trials", "0").code == 0  # its own file: rewritten each time
    assert (runs_dir / "s-best.toml").is_file()


def test_without_optuna_the_command_is_a_one_line_hint(tune_args: list[str], tmp_path: Path) -> None:
    """A real process where `import optuna` fails, as it does without the extra."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "optuna.py").write_text("raise ModuleNotFoundError(\"No module named 'optuna'\", name='optuna')\n")
    path = os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])
    done = lstmlm_process(*tune_args, env={"PYTHONPATH": path})
    assert_one_error_line(Result(done.returncode, done.stdout, done.stderr), "lstmlm tune needs Optuna: pip install 'lstmlm[tune]'")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("nope://somewhere", "Can't load plugin"),
        ("sqlite:////no/such/directory/tune.db", "unable to open database file"),
        ("not a url", "cannot open the study storage not a url"),
    ],
)
def test_a_storage_that_cannot_be_opened_is_one_line(tune_args: list[str], url: str, reason: str) -> None:
    assert_one_error_line(cli(*tune_args, "--storage", url), "cannot open the study storage", reason)


def test_a_storage_password_never_reaches_the_terminal(tune_args: list[str]) -> None:
    result = cli(*tune_args, "--storage", "postgresql://me:s3cret@127.0.0.1:9/studies")  # no driver here, or no server
    assert_one_error_line(result, "cannot open the study storage postgresql://me:***@127.0.0.1:9/studies")
    assert "s3cret" not in result.stderr + result.stdout


def sqlite_file(path: Path, *tables: str) -> Path:
    """A real SQLite file holding `tables` ("name (columns)"), as another program leaves one."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        for table in tables:
            db.execute(f"CREATE TABLE {table}")
        db.commit()
    return path


def tables_of(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_sqlite_file_of_another_program_is_refused_in_one_line_and_left_alone(tune_args: list[str], tmp_path: Path) -> None:
    """It was "internal error" (its `studies` table is not Optuna's), or Optuna's tables added to it."""
    for name, tables, message in [
        ("clash.db", ["studies (name TEXT, colour TEXT)"], "is a database of another program (its tables: studies)"),
        ("notes.db", ["notes (body TEXT)"], "is a database of another program (its tables: notes)"),
    ]:
        path = sqlite_file(tmp_path / name, *tables)
        assert_one_error_line(cli(*tune_args, "--storage", f"sqlite:///{path}"), f"the study storage sqlite:///{path} {message}")
        assert tables_of(path) == {t.split()[0] for t in tables}  # nothing written into it
    # one that names Optuna's tables but is not theirs gets past that check: still one line
    version_info = "version_info (version_info_id INTEGER PRIMARY KEY, schema_version INT, library_version TEXT)"
    path = sqlite_file(tmp_path / "lookalike.db", version_info, "studies (name TEXT)")
    assert_one_error_line(cli(*tune_args, "--storage", f"sqlite:///{path}"), f"cannot read the studies in sqlite:///{path}: no such column: studies.study_id")


DAMAGES = {
    "a parameter not a number": "UPDATE trial_params SET param_value = 'nan'",
    "a distribution of another shape": "UPDATE trial_params SET distribution_json = '{}'",
    "a complete trial without its value": "UPDATE trial_values SET value = NULL",
    "a trial's attribute cut short": "UPDATE trial_user_attributes SET value_json = '{'",
    "the study's settings cut short": "UPDATE study_user_attributes SET value_json = '[1'",
    "the study's settings of another type": "UPDATE study_user_attributes SET value_json = '[1]'",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_study_database_is_one_line_naming_it_and_left_alone(tune_args: list[str], runs_dir: Path, damage: str) -> None:
    """A study's database edited or damaged was "internal error: ValueError ... please report
    it" (from inside Optuna, decoding its rows): it is one line saying so, before any trial."""
    assert cli(*tune_args, "--trials", "1").code == 0
    database = runs_dir / "tune-s.db"
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.execute(DAMAGES[damage])
        db.commit()
    damaged = database.read_bytes()
    result = cli(*tune_args, "--trials", "1")
    assert_one_error_line(result, f"study s in {storage_of(runs_dir)} holds a record that cannot be read (", "the database is damaged")
    assert database.read_bytes() == damaged and not (runs_dir / "s-trial-1").exists()  # nothing written, no trial run


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_a_study_in_memory_is_refused(tune_args: list[str], url: str, runs_dir: Path) -> None:
    assert_one_error_line(cli(*tune_args, "--storage", url), f"the study storage {url} is a database in memory: the study would end with this process")
    assert not runs_dir.exists()  # refused before a trial ran


def test_a_password_in_the_query_string_never_reaches_the_terminal(tune_args: list[str]) -> None:
    url = "postgresql://me@127.0.0.1:9/studies?sslmode=disable&password=s3cret&sslpassword=pr1vate"
    result = cli(*tune_args, "--storage", url)
    assert_one_error_line(result, "cannot open the study storage postgresql://me@127.0.0.1:9/studies?sslmode=disable&password=***&sslpassword=***")
    assert "s3cret" not in result.stderr + result.stdout and "pr1vate" not in result.stderr + result.stdout
    command = tune.continue_command(tune.Setup(1.0, {}, storage=url), "s", 3)
    assert "s3cret" not in command and "password=***" in command


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--study", "../up"], 1, "--study must be a plain name"),
        (["--study", ""], 1, "--study must be a plain name"),  # was the default study, unsaid
        (["--pruner", "hyperband"], 2, "'hyperband' is not one of"),
        (["--max-minutes", "3"], 2, "No such option: --max-minutes"),
        (["--normalize", "d2l", "--val-fraction", "0"], 1, "no validation text: give --val-fraction or --split"),
    ],
)
def test_usage_and_setting_errors(tune_args: list[str], args: list[str], code: int, message: str) -> None:
    result = cli(*tune_args, *args)
    if code == 1:
        assert_one_error_line(result, message)
    else:
        assert result.code == 2 and message in result.stderr


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        (b"", [], "corpus {corpus} is empty"),
        (b"text\x00more text", [], "corpus {corpus} looks binary (NUL byte at offset 4)"),
        (None, ["--normalize", "d2l", "--val-fraction", "0"], "no validation text: give --val-fraction or --split"),
    ],
)
def test_a_corpus_refused_leaves_no_study_database_behind(
    tune_args: list[str], corpus_file: Path, runs_dir: Path, text: bytes | None, args: list[str], message: str
) -> None:
    if text is not None:
        corpus_file.write_bytes(text)
    assert_one_error_line(cli(*tune_args, *args), message.format(corpus=corpus_file))
    assert not runs_dir.exists()  # neither tune-s.db nor the directory made for it


def test_minutes_no_clock_reaches_are_refused_before_the_study_is_made(tune_args: list[str], runs_dir: Path) -> None:
    """--minutes inf passed the check (positive) and was refused by each trial's cadence,
    "[train] eval_every must be ... not 'infm'", its study's database already made."""
    assert_one_error_line(cli(*tune_args, "--minutes", "inf"), "--minutes must be a positive number, not inf")
    assert not runs_dir.exists()


def test_minutes_are_required(corpus_file: Path) -> None:
    result: Result = cli("tune", "--corpus", corpus_file)
    assert result.code == 2 and "Missing option '--minutes'" in result.stderr


def test_the_space_is_the_configs_fields_less_the_fixed() -> None:
    """SPACE names config fields, each searched unless an option fixes it; a dimension of a
    field the config does not have is refused where it is declared."""
    keys = [d.key for d in tune.search_space({})]
    assert keys[:4] == ["hidden", "layers", "embedding", "lr"] and {"weight_drop", "locked_dropout", "ar", "tar"} <= set(keys)
    assert keys == [d.key for d in tune.SPACE]
    assert "hidden" not in [d.key for d in tune.search_space({"hidden": 64})]
    with pytest.raises(ConfigError, match="unknown config key 'hiden'"):
        tune.Dimension("hiden", 64, 1024)
    with pytest.raises(ConfigError, match="unknown config key 'layer'"):
        tune.Dimension("dropout_hidden", 0.0, 0.5, needs=("layer", 1))


def test_a_setting_that_needs_another_is_searched_only_where_it_applies() -> None:
    """Dropout between layers needs two layers, embedding dropout an embedding: the config would
    refuse either otherwise, so the trial does not sample them."""
    needs = {d.key: d.needs for d in tune.SPACE if d.needs}
    assert needs == {"dropout_input": ("embedding", 0), "dropout_hidden": ("layers", 1), "embedding_dropout": ("embedding", 0)}
    hidden = next(d for d in tune.SPACE if d.key == "dropout_hidden")
    assert not hidden.applies({"layers": 1}.__getitem__) and hidden.applies({"layers": 2}.__getitem__)


@pytest.mark.parametrize(
    ("fixed", "words"),
    [
        ({}, "lstmlm tune --study s --minutes 10 --trials 5"),
        ({"hidden": 64, "corpus": "my book.txt", "tf32": True}, "--hidden 64 --corpus 'my book.txt' --tf32"),
    ],
)
def test_the_continue_command_repeats_the_options(fixed: dict[str, Any], words: str) -> None:
    setup = tune.Setup(10.0, {"lr": None, **fixed}, storage="postgresql://me:pw@db/x")
    command = tune.continue_command(setup, "s", 5)
    assert words in command and "--storage 'postgresql://me:***@db/x'" in command and "--lr" not in command


HELP_IMPORTS = """
import sys
import time
import warnings
from lstmlm.cli import app
try:
    app(sys.argv[1:], prog_name="lstmlm")
except SystemExit:
    pass
print(sorted(m for m in ("torch", "optuna") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["tune", "--help"]])
def test_help_imports_neither_torch_nor_optuna(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *args], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_a_trial_tells_optuna_even_when_its_events_stop_being_read(tune_args: list[str], runs_dir: Path, corpus_file: Path) -> None:
    """The consumer closing the generator mid-trial (GeneratorExit) fails the trial."""
    tiny = {"hidden": 16, "layers": 1, "embedding": 8, "batch_size": 8, "num_steps": 10, "device": "cpu"}
    setup = tune.Setup(MINUTES, {"corpus": str(corpus_file), "normalize": "raw", **tiny}, runs_dir=runs_dir, study="s")
    events = tune.run_study(tune.open_study(setup), 3)
    first = next(e for e in events if isinstance(e, tune.TrialEvaluated))
    assert first.number == 0
    events.close()
    assert states(runs_dir) == ["FAIL"]


def test_a_trial_whose_process_died_is_failed_by_the_next_process_to_ask(tune_args: list[str], runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna beats heartbeats only inside study.optimize; tune beats its own, so a trial left
    running by a process that died (kill -9) is failed once it has been silent GRACE_S."""
    assert cli(*tune_args, "--trials", "0").code == 0
    monkeypatch.setattr(tune.storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tune.storage, "GRACE_S", 1)
    storage = tune.open_storage(storage_of(runs_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # asking outside study.optimize with a heartbeat: Optuna warns
        orphan = optuna.load_study(study_name="s", storage=storage).ask()
    tune.Heartbeat(storage, "s", orphan.number)()  # it beat once; then its process died
    time.sleep(2.1)  # past the grace of 1 s on SQLite's clock, which counts whole seconds
    assert cli(*tune_args, "--trials", "1").code == 0
    assert states(runs_dir) == ["FAIL", "COMPLETE"]
