"""`lstmlm tune`: a study of real trainings on Optuna, each sampled, pruned on its validation
curve, and stored in a database that several processes (and machines) share.

    open_study   the storage (runs/tune-STUDY.db, or any SQLAlchemy URL) and the study in it,
                 made or joined; a study joined must have been made with the same settings
    run_study    trials one after another, as events (TrialStarted, TrialEvaluated, TrialEnded,
                 then StudyEnded); at the end the best trial's config written as TOML

A trial is `lstmlm train` (training.plan → training.start → Trainer.run) of the
base config — a --config file or the defaults, with the options given fixed — and the rest of
SPACE sampled by Optuna's TPE, for --minutes. It validates VALIDATIONS times along its minutes
and reports each loss to Optuna as step 1, 2, …: a step is a fraction of the time, so trials
of any speed are compared at the same point of their budget. When the pruner says so, the
trainer is stopped through its one stop path (`should_stop`) and the trial is pruned. A
trial's value is its best validation loss in nats per token: the model in its run's best.pt.

Optuna and not a hand-written search: TPE, the median and successive-halving pruners, and an
RDB storage that processes share safely (the constant liar spreads trials run at once) are a
well-kept library's work. Trials are asked and told here, so that a trial is a generator of
events like a training; Optuna beats a trial's heartbeat only inside `study.optimize`, so the
loop beats it itself, and a trial whose process died (kill -9, a lost machine) is failed by
the next process to ask for one after GRACE_S.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Callable, Generator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config, config_file, distributed
from .atomic import check_output, write_text_output
from .config import Config
from .corpus import StageProgress
from .errors import ConfigError, CorpusError, DeviceError, TrainingError, TuneError
from .events import Evaluated, Started
from .runs import DEFAULT_RUNS_DIR, RunExists
from .training import plan as plan_training
from .training import run_base_name
from .training import start as start_training

if TYPE_CHECKING:
    import optuna

EXTRA_HINT = "lstmlm tune needs Optuna: pip install 'lstmlm[tune]'"

VALIDATIONS = 8  # per trial, evenly over its minutes: the points its curve is pruned at
TRIAL_VAL_TOKENS = 50_000  # a trial validates on this fixed sample (unless --val-tokens): 8 validations cost little of its time
FAILURES_IN_A_ROW = 3  # trials failing one after another: the study stops (a disk full, a machine too small)
HEARTBEAT_S, GRACE_S = 60, 600  # a running trial's heartbeat; a trial silent this long is failed
PRUNERS = ("median", "halving")

# What a trial sets for itself (unless an option gives it) and the best trial's config does not
# keep: `lstmlm train` validates, checkpoints and samples at its own cadences.
TRIAL_ONLY = ("eval_every", "checkpoint_every", "sample_every", "val_tokens")

# Settings that may differ between the processes of one study: where the corpus is on each
# machine (its content must be the same), what each computes on, where each logs (TensorBoard:
# a trial's run is a subdirectory there).
PER_MACHINE = frozenset({"corpus", "device", "precision", "tf32", "tensorboard"})


# ---- the search space --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One config field searched: integers or floats in [low, high] (log-scaled if `log`), or one of `choices`."""

    key: str
    low: int | float = 0
    high: int | float = 0
    log: bool = False
    choices: tuple[Any, ...] = ()
    needs: tuple[str, int] | None = None  # (key, n): searched only where that setting exceeds n (else the config refuses it)

    def applies(self, settings: dict[str, Any]) -> bool:
        return self.needs is None or settings.get(self.needs[0], 0) > self.needs[1]

    def sample(self, trial: optuna.Trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


SPACE = (
    Dimension("hidden", 64, 1024, log=True),
    Dimension("layers", 1, 3),
    Dimension("embedding", 16, 256, log=True),
    Dimension("lr", 3e-4, 3e-2, log=True),
    Dimension("optimizer", choices=("adam", "adamw")),
    Dimension("weight_decay", choices=(0.0, 0.01, 0.1)),  # adam: L2; adamw: decoupled
    Dimension("schedule", choices=("constant", "cosine")),
    Dimension("warmup_steps", 0, 300),
    Dimension("batch_size", 16, 128, log=True),
    Dimension("num_steps", 32, 256, log=True),
    Dimension("reset_every", choices=(0, 10, 20, 50)),  # batches between a row's fresh states; 0: never
    Dimension("dropout", 0.0, 0.5),
    # AWD-LSTM's regularization (the other half of issue 19): searched once the config has the field
    Dimension("weight_drop", 0.0, 0.5),  # DropConnect on W_h
    Dimension("locked_dropout", choices=(False, True)),  # one mask a sequence for the three below
    Dimension("dropout_input", 0.0, 0.5, needs=("embedding", 0)),
    Dimension("dropout_hidden", 0.0, 0.5, needs=("layers", 1)),
    Dimension("dropout_output", 0.0, 0.5),
    Dimension("embedding_dropout", 0.0, 0.3, needs=("embedding", 0)),
    Dimension("ar", 0.0, 3.0),  # activation regularization α
    Dimension("tar", 0.0, 2.0),  # temporal activation regularization β
)


def search_space(fixed: dict[str, Any]) -> tuple[Dimension, ...]:
    """The dimensions of SPACE this config has a field for, less those the options fix."""
    return tuple(d for d in SPACE if d.key in config_keys() and d.key not in fixed)


def config_keys() -> frozenset[str]:
    return frozenset(f.name for table in config.SECTIONS.values() for f in fields(table))


# ---- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialStarted:
    number: int
    run: str
    params: dict[str, Any]  # the values sampled


@dataclass(frozen=True)
class TrialEvaluated:
    number: int
    step: int  # validations so far: step k of VALIDATIONS is k/VALIDATIONS of the minutes
    val_loss: float  # nats per token
    prune: bool  # the pruner stops the trial here


@dataclass(frozen=True)
class TrialEnded:
    number: int
    state: str  # complete | pruned | failed
    val_loss: float | None  # the trial's best validation loss, nats per token
    parameters: int | None
    minutes: float  # wall-clock, data and validations included
    run: str
    settings: dict[str, Any]  # the searched fields' values, sampled or fixed
    reason: str = ""  # why it was pruned or failed

    @property
    def val_bits(self) -> float | None:
        return self.val_loss / math.log(2) if self.val_loss is not None else None


@dataclass(frozen=True)
class Best:
    number: int
    val_loss: float
    run: str
    config: Config


@dataclass(frozen=True)
class StudyEnded:
    reason: str  # "trials" (this process ran its trials) | "interrupted"
    best: Best | None  # the study's best complete trial, whichever process ran it
    output: Path | None  # where its config was written
    states: dict[str, int]  # the study's trials by state: complete, pruned, failed, running


TuneEvent = TrialStarted | TrialEvaluated | TrialEnded | StudyEnded


# ---- the study -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What a study's trials share, as the command line gave it."""

    minutes: float  # each trial's training time
    overrides: dict[str, Any]  # config fields the options gave (None: not given)
    config_file: Path | None = None  # the base config; the defaults without one
    runs_dir: Path = DEFAULT_RUNS_DIR
    study: str | None = None  # default: corpus-model-Mm
    storage: str | None = None  # default: sqlite under the runs directory
    pruner: str = "median"
    startup_trials: int = 5  # trials the median pruner lets finish before it prunes any

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if v is not None}


@dataclass(frozen=True)
class Study:
    """An opened study: Optuna's, and what lstmlm needs to run its trials."""

    optuna_study: optuna.Study
    storage: Any  # Optuna's RDBStorage
    name: str
    shown: str  # the storage's URL, its password hidden
    created: bool
    trials_before: int  # trials it held when opened, in any state
    setup: Setup
    base: Config  # the base config with the options given: what every trial starts from
    space: tuple[Dimension, ...]

    @property
    def runs_dir(self) -> Path:
        return self.setup.runs_dir


def require_optuna() -> Any:
    """The optuna module, or a TuneError with the pip command when it is not installed."""
    try:
        import optuna
    except ImportError:
        raise TuneError(EXTRA_HINT) from None
    return optuna


def open_study(setup: Setup, progress: StageProgress | None = None) -> Study:
    """Check the setup, open the storage, read and encode the corpus (`progress` following),
    then make the study or join it: `load_if_exists`, so every process given the same --study
    and --storage runs trials of the one study. A study joined must have the same settings."""
    optuna = require_optuna()
    if setup.pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be median or halving, not {setup.pruner!r}")
    if not setup.minutes > 0:
        raise ConfigError("--minutes must be positive")
    if distributed.from_environment().active:
        raise ConfigError("lstmlm tune trains a trial in one process: start several tune processes on one --study instead of torchrun")
    named = (config_file.load(setup.config_file) if setup.config_file else Config()).with_overrides(setup.overrides).resolved()
    name = check_study_name(setup.study or f"{run_base_name(named)}-{setup.minutes:g}m")
    url = setup.storage or default_storage(setup.runs_dir, name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the library prints nothing; the CLI shows the trials
    storage = open_storage(url)  # before the corpus, which may take minutes to encode the first time
    shown = hide_password(url)
    base = plan_training(setup.runs_dir, None, setup.overrides, setup.config_file, default_recipe=False, progress=progress)
    if len(base.data.val) < 2:
        raise ConfigError("tune compares trials by their validation loss, and this corpus has no validation text: give --val-fraction or --split")
    created = not _exists(storage, name, shown)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE and the constant liar (experimental in Optuna 3)
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True)
        study = _create(optuna, storage, name, shown, sampler, make_pruner(setup))
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise TuneError(f"study {name} in {shown} maximizes: lstmlm's studies minimize the validation loss; choose another --study")
    check_settings(study, name, settings(setup, base.config, base.data.source_sha1))
    before = len(study.get_trials(deepcopy=False))
    return Study(study, storage, name, shown, created, before, setup, base.config, search_space(setup.fixed))


def check_study_name(name: str) -> str:
    """A study names files (its database, its runs, its best config): a plain name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise ConfigError(f"--study must be a plain name of letters, digits and . _ + -, not {name!r}")
    return name


def default_storage(runs_dir: Path, name: str) -> str:
    runs_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs_dir / f'tune-{name}.db'}"


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, or a TuneError in one line. SQLite waits for another
    process's write (its lock) instead of failing at once; other databases check a pooled
    connection before using it, since a trial can leave one idle for longer than a server keeps it.
    A SQLite database in memory is refused (the study would end with this process, unseen by any
    other), and so is a SQLite file of another program (Optuna would add its tables to it)."""
    optuna = require_optuna()
    shown = hide_password(url)
    check_sqlite(url, shown)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's arguments
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # SQLAlchemy's and the drivers' errors: a bad URL, a missing driver, no server, no such file
        raise TuneError(f"cannot open the study storage {shown}: {_reason(e).replace(url, shown)}") from None


def check_sqlite(url: str, shown: str) -> None:
    """Refuse a SQLite URL whose database is in memory, or a file that holds tables, none of them
    Optuna's (its `version_info`): another program's database. Other URLs pass unchecked."""
    database = _sqlite_database(url)
    if database is None:
        return
    if database == "":
        raise TuneError(
            f"the study storage {shown} is a database in memory: the study would end with this process and no other could join it; "
            "give a file (sqlite:///tune.db), or no --storage for RUNS_DIR/tune-STUDY.db"
        )
    tables = _sqlite_tables(database)
    if tables and "version_info" not in tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TuneError(f"the study storage {shown} is a database of another program (its tables: {listed}): give lstmlm tune a --storage of its own")


def _sqlite_database(url: str) -> str | None:
    """The file a SQLite URL names; "" for a database in memory; None for any other URL."""
    from sqlalchemy.engine import make_url  # Optuna's own dependency

    try:
        parsed = make_url(url)
    except Exception:  # not a URL: opening it says so
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    return "" if database == ":memory:" or parsed.query.get("mode") == "memory" else database


def _sqlite_tables(path: str) -> set[str]:
    """The tables of an existing SQLite file (none for a missing file, or one that is not SQLite:
    opening it reports that)."""
    if not os.path.isfile(path):
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True)) as db:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return set()


# A URL's query string may carry a password too (?password=, &sslpassword=, &token=, ...).
_SECRET_PARAMETER = re.compile(r"([?&][^=&#]*(?:pass|pwd|secret|token|key)[^=&#]*=)[^&#]*", re.IGNORECASE)


def hide_password(url: str) -> str:
    """`url` with the password of user:password@, and any query parameter named like a secret,
    shown as ***."""
    return _SECRET_PARAMETER.sub(r"\1***", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))


def _reason(e: BaseException) -> str:
    """SQLAlchemy's message in one line, without its statement and its link to the docs; the
    cause's, where Optuna wrapped it in its own ("An exception is raised during the commit")."""
    e = e.__cause__ or e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", first)
    return re.sub(r"^\([\w.]+\)\s*", "", first)[:300] or type(e).__name__


def _exists(storage: Any, name: str, shown: str) -> bool:
    """Whether the storage holds the study: the first read of its tables, where a database of
    another schema fails (Optuna then says only that a commit failed: its cause says why)."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    except Exception as e:
        raise TuneError(f"cannot read the studies in {shown}: {_reason(e)}; is it a storage of lstmlm tune? give it a --storage of its own") from None
    return True


def _create(optuna: Any, storage: Any, name: str, shown: str, sampler: Any, pruner: Any) -> Any:
    try:
        return optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler, pruner=pruner, load_if_exists=True)
    except Exception as e:  # the database refuses (a read-only file, a lost connection)
        raise TuneError(f"cannot open study {name} in {shown}: {_reason(e)}") from None


def make_pruner(setup: Setup) -> Any:
    """Median: a trial is stopped at a validation where it is worse than the median of the
    trials before it at the same point (from the second, once `startup_trials` have finished).
    Halving (successive halving): rungs at validations 2 and 6; at each, only the best third
    of the trials that got there go on. Neither prunes at the first validation: the model is
    still in its warm-up, where small models lead."""
    optuna = require_optuna()
    if setup.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=setup.startup_trials, n_warmup_steps=2)


SETTINGS = "lstmlm"  # the study's user attribute that holds what its trials share


def settings(setup: Setup, cfg: Config, corpus_sha1: str) -> dict[str, Any]:
    """What every process of a study must agree on, as JSON: the minutes, the corpus's content
    and the base config (less what may differ between machines)."""
    base = {k: v for table in cfg.to_dict().values() for k, v in table.items() if k not in PER_MACHINE}
    agreed: dict[str, Any] = json.loads(json.dumps({"minutes": setup.minutes, "corpus_sha1": corpus_sha1, "base": base}))  # as the storage gives it back
    return agreed


def check_settings(study: Any, name: str, mine: dict[str, Any]) -> None:
    """Record the settings in a new study; refuse to join one made with others."""
    stored = study.user_attrs.get(SETTINGS)
    if stored is None:
        study.set_user_attr(SETTINGS, mine)
        return
    minutes = stored.get("minutes")
    if minutes != mine["minutes"]:
        raise TuneError(f"study {name} trains each trial for {minutes} minutes, not {mine['minutes']}: give --minutes {minutes:g}, or another --study")
    if stored.get("corpus_sha1") != mine["corpus_sha1"]:
        raise TuneError(f"study {name} was made on another corpus (SHA-1 {stored.get('corpus_sha1')}, this one {mine['corpus_sha1']}): choose another --study")
    theirs, ours = stored.get("base", {}), mine["base"]
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            raise TuneError(f"study {name} was made with {key} = {theirs.get(key)!r}, this has {ours.get(key)!r}: give the same options, or another --study")


# ---- the trials ----------------------------------------------------------------------------------


def run_study(
    study: Study, trials: int, should_stop: Callable[[], bool] = lambda: False, output: Path | None = None, force: bool = False
) -> Generator[TuneEvent, None, None]:
    """Run `trials` trials (fewer if `should_stop()` says so), then write the study's best
    trial's config to `output` and say how it stands. The default, RUNS_DIR/STUDY-best.toml, is
    the study's own, rewritten by each of its processes; an `output` given that exists is
    replaced only with `force` (atomic.write_output's rule), refused here, before any trial."""
    path = output or study.runs_dir / f"{study.name}-best.toml"
    check_output(path, force or output is None)
    return _run_study(study, trials, should_stop, path)


def _run_study(study: Study, trials: int, should_stop: Callable[[], bool], path: Path) -> Generator[TuneEvent, None, None]:
    failures = 0
    for _ in range(trials):
        if should_stop():
            break
        ended = yield from run_trial(study, should_stop)
        yield ended
        failures = failures + 1 if ended.state == "failed" and ended.reason != "interrupted" else 0
        if failures >= FAILURES_IN_A_ROW:
            raise TuneError(f"{failures} trials in a row failed; the last: {ended.reason}")
    best = best_trial(study)
    if best is not None:
        write_best(best, study, path)  # allowed when the study began, which may be hours ago
    yield StudyEnded("interrupted" if should_stop() else "trials", best, path if best is not None else None, states(study))


def sample(study: Study, trial: optuna.Trial) -> dict[str, Any]:
    """The trial's settings, in SPACE's order, so a dimension that needs another (dropout
    between layers needs layers > 1) sees its value, sampled or given."""
    settings = {f.name: getattr(table, f.name) for table in (study.base.data, study.base.model, study.base.train) for f in fields(table)}
    params: dict[str, Any] = {}
    for d in study.space:
        if d.applies({**settings, **params}):
            params[d.key] = d.sample(trial)
    return params


def run_trial(study: Study, should_stop: Callable[[], bool]) -> Generator[TuneEvent, None, TrialEnded]:
    """Ask Optuna for a trial, train it, tell Optuna how it went. Whatever ends it — the
    pruner, Ctrl-C, an error — it is told: never left running."""
    trial = _ask(study)
    run = f"{study.name}-trial-{trial.number}"
    outcome = Outcome(time.perf_counter())
    try:
        params = sample(study, trial)
        trial.set_user_attr("run", run)
        outcome.settings = dict(params)
        yield TrialStarted(trial.number, run, params)
        yield from train_trial(study, trial, run, params, outcome, should_stop)
    except TrainingError as e:  # diverged: pruned, so that TPE learns this corner is bad (a failed trial teaches it nothing)
        outcome.end("pruned", f"diverged: {e}")
    except (DeviceError, CorpusError) as e:  # too large for this machine, batches too long for the text: this trial's own
        outcome.end("failed", str(e))
    except RunExists:
        _tell(study, trial, "failed")
        here = f"run {run} already exists in {study.runs_dir}"
        raise TuneError(f"{here}: a study named {study.name} ran here with another storage; choose another --study") from None
    except BaseException:  # Ctrl-C a second time, an error in the library, the generator closed
        _tell(study, trial, "failed")
        raise
    state = _tell(study, trial, outcome.state, outcome.best)
    return outcome.ended(trial.number, state, run)


class Outcome:
    """How a trial is going: its best validation, its size, and once decided, its state."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.settings: dict[str, Any] = {}  # the searched fields' values: sampled, then as the config has them
        self.best: float | None = None
        self.parameters: int | None = None
        self.state, self.reason = "complete", ""
        self.prune = False  # the pruner has said so: the training stops

    def end(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason

    def ended(self, number: int, state: str, run: str) -> TrialEnded:
        reason = self.reason if state == self.state else f"{state} by another process (no heartbeat for {GRACE_S} s)"
        minutes = (time.perf_counter() - self.start) / 60
        return TrialEnded(number, state, self.best, self.parameters, minutes, run, self.settings, reason)


def train_trial(
    study: Study, trial: optuna.Trial, run: str, params: dict[str, Any], outcome: Outcome, should_stop: Callable[[], bool]
) -> Generator[TuneEvent, None, None]:
    """One trial's training, as `lstmlm train` runs it, its validations reported to Optuna."""
    overrides = {**trial_overrides(study.setup), **params}
    plan = plan_training(study.runs_dir, run, overrides, study.setup.config_file, default_recipe=False)
    outcome.settings = {d.key: plan.config.value(d.key) for d in SPACE if d.key in config_keys()}  # sampled or fixed
    trial.set_user_attr("config", best_config(plan.config, study.base, study.setup.fixed).to_dict())
    heartbeat = Heartbeat(study.storage, study.name, trial.number)
    step = 0
    with start_training(plan) as training:
        for event in training.run(lambda: outcome.prune or should_stop()):
            heartbeat()
            if isinstance(event, Started):
                outcome.parameters = event.num_params
            elif isinstance(event, Evaluated):
                step += 1
                loss = math.log(event.val_perplexity)
                outcome.best = loss if outcome.best is None else min(outcome.best, loss)
                trial.report(loss, step)
                outcome.prune = outcome.prune or trial.should_prune()
                yield TrialEvaluated(trial.number, step, loss, outcome.prune)
    if outcome.prune:
        outcome.end("pruned", f"at validation {step} of {VALIDATIONS}")
    elif should_stop():
        outcome.end("failed", "interrupted")


def trial_overrides(setup: Setup) -> dict[str, Any]:
    """The options given, the minutes, and a trial's own settings where no option gave them:
    VALIDATIONS validations over the minutes on a sample of TRIAL_VAL_TOKENS, a checkpoint and
    samples only at the end (the run keeps its best.pt)."""
    every = f"{setup.minutes / VALIDATIONS:.6f}".rstrip("0").rstrip(".") + "m"
    own = {"eval_every": every, "checkpoint_every": "0", "sample_every": "0", "val_tokens": TRIAL_VAL_TOKENS}
    return {**{k: v for k, v in own.items() if k not in setup.fixed}, **setup.fixed, "max_minutes": setup.minutes}


def best_config(cfg: Config, base: Config, fixed: dict[str, Any]) -> Config:
    """A trial's config as a recipe for `lstmlm train --config`: the trial's settings and
    minutes, with the base's cadences and validation sample in place of the trial's own."""
    return cfg.with_overrides({k: base.value(k) for k in TRIAL_ONLY if k not in fixed})


class Heartbeat:
    """Tells the storage, at most every HEARTBEAT_S, that the trial still runs (called on every
    event of its training: a step takes far less than GRACE_S)."""

    def __init__(self, storage: Any, study: str, number: int) -> None:
        self.storage = storage
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)
        self.last = -math.inf

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_S:
            self.storage.record_heartbeat(self.trial_id)
            self.last = now


def _ask(study: Study) -> optuna.Trial:
    """A new trial, after failing those whose process has stopped beating (kill -9, a lost machine)."""
    optuna = require_optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")  # it is beaten here
        optuna.storages.fail_stale_trials(study.optuna_study)
        return study.optuna_study.ask()


def _tell(study: Study, trial: optuna.Trial, state: str, value: float | None = None) -> str:
    """Tell Optuna how the trial ended; the state it has in the storage after that (a trial
    failed meanwhile by another process, for a heartbeat it missed, stays failed)."""
    optuna = require_optuna()
    TrialState = optuna.trial.TrialState
    told = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[state]
    frozen = study.optuna_study.tell(trial, value if told == TrialState.COMPLETE else None, state=told, skip_if_finished=True)
    return state_name(frozen.state)


def state_name(state: Any) -> str:
    """lstmlm's word for an Optuna TrialState."""
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state.name, str(state.name).lower())


# ---- the study's result --------------------------------------------------------------------------


def best_trial(study: Study) -> Best | None:
    """The study's best complete trial (by any process), or None before one completes."""
    try:
        trial = study.optuna_study.best_trial
    except ValueError:  # no trial has completed
        return None
    if trial.value is None or "config" not in trial.user_attrs:
        raise TuneError(f"trial {trial.number} of study {study.name} has no lstmlm config: a study of lstmlm tune is run by lstmlm tune only")
    cfg = config.from_dict(trial.user_attrs["config"])
    return Best(trial.number, float(trial.value), str(trial.user_attrs.get("run", "")), cfg)


def write_best(best: Best, study: Study, path: Path) -> None:
    header = f"lstmlm tune: trial {best.number} of study {study.name}, validation loss {best.val_loss:.4f} nats per token, run {best.run}"
    write_text_output(path, best.config.to_toml(header), "best trial's config", force=True)


def states(study: Study) -> dict[str, int]:
    counts = dict.fromkeys(("complete", "pruned", "failed", "running"), 0)
    for trial in study.optuna_study.get_trials(deepcopy=False):
        name = state_name(trial.state)
        counts[name] = counts.get(name, 0) + 1
    return counts


def continue_command(setup: Setup, study: str, trials: int) -> str:
    """The command that runs more trials of the study: the one given, its options repeated."""
    words = ["lstmlm", "tune", "--study", study, "--minutes", f"{setup.minutes:g}", "--trials", str(trials)]
    if setup.storage:
        words += ["--storage", hide_password(setup.storage)]
    if setup.config_file is not None:
        words += ["--config", str(setup.config_file)]
    if setup.runs_dir != DEFAULT_RUNS_DIR:
        words += ["--runs-dir", str(setup.runs_dir)]
    if setup.pruner != "median":
        words += ["--pruner", setup.pruner]
    for key, value in setup.fixed.items():
        words += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(words)

