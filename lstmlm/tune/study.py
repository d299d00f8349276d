"""A study: its setup as the command line gave it, opened (made or joined) in its storage with
the settings every process of it must share, and what it holds at the end (its best trial, its
trials by state, the command that runs more of them)."""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from .. import config, config_file, distributed
from ..atomic import write_text_output
from ..config import Config
from ..data.download import StageProgress
from ..errors import ConfigError, TuneError
from ..runs import DEFAULT_RUNS_DIR
from ..training import plan as plan_training
from ..training import run_base_name
from .space import Dimension, search_space
from .storage import check_sqlite, hide_password, holds_study, open_storage, quiet, reason

PRUNERS = ("median", "halving")

# Settings that may differ between the processes of one study: where the corpus is on each
# machine (its content must be the same), what each computes on, where each logs (TensorBoard:
# a trial's run is a subdirectory there).
PER_MACHINE = frozenset({"corpus", "device", "precision", "tf32", "tensorboard"})

SETTINGS = "lstmlm"  # the study's user attribute that holds what its trials share


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


@dataclass(frozen=True)
class Best:
    number: int
    val_loss: float
    run: str
    config: Config


def open_study(setup: Setup, progress: StageProgress | None = None) -> Study:
    """Check the setup, read and encode the corpus (`progress` following), open the storage,
    then make the study or join it: `load_if_exists`, so every process given the same --study
    and --storage runs trials of the one study. A study joined must have the same settings.
    The storage is opened (a SQLite file made) only once the corpus has passed train's checks,
    so a tune refused for its corpus leaves no database behind."""
    if setup.pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be median or halving, not {setup.pruner!r}")
    if not 0 < setup.minutes < math.inf:
        raise ConfigError(f"--minutes must be a positive number, not {setup.minutes:g}")
    if distributed.from_environment().active:
        raise ConfigError("lstmlm tune trains a trial in one process: start several tune processes on one --study instead of torchrun")
    named = (config_file.load(setup.config_file) if setup.config_file else Config()).with_overrides(setup.overrides).resolved()
    name = check_study_name(f"{run_base_name(named)}-{setup.minutes:g}m" if setup.study is None else setup.study)
    url = setup.storage or default_storage(setup.runs_dir, name)
    shown = hide_password(url)
    check_sqlite(url, shown)  # a URL refused without writing anything: before the corpus, which may take minutes to encode
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the library prints nothing; the CLI shows the trials
    base = plan_training(setup.runs_dir, None, setup.overrides, setup.config_file, default_recipe=False, progress=progress)
    if len(base.data.val) < 2:
        raise ConfigError("tune compares trials by their validation loss, and this corpus has no validation text: give --val-fraction or --split")
    if setup.storage is None:  # the default database's directory, made once nothing is left to refuse
        setup.runs_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url)
    created = not holds_study(storage, name, shown)
    study = _create(storage, name, shown, make_pruner(setup))
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise TuneError(f"study {name} in {shown} maximizes: lstmlm's studies minimize the validation loss; choose another --study")
    before = read_study(study, name, shown, settings(setup, base.config, base.data.source_sha1))
    return Study(study, storage, name, shown, created, before, setup, base.config, search_space(setup.fixed))


def check_study_name(name: str) -> str:
    """A study names files (its database, its runs, its best config): a plain name."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
        raise ConfigError(f"--study must be a plain name of letters, digits and . _ + -, not {name!r}")
    return name


def default_storage(runs_dir: Path, name: str) -> str:
    return f"sqlite:///{runs_dir / f'tune-{name}.db'}"


def _create(storage: Any, name: str, shown: str, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The study, made or joined, sampled by multivariate TPE with the constant liar (which
    spreads the trials that processes run at once)."""
    try:
        with quiet():
            sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True)
            return optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler, pruner=pruner, load_if_exists=True)
    except Exception as e:  # the database refuses (a read-only file, a lost connection)
        raise TuneError(f"cannot open study {name} in {shown}: {reason(e)}") from None


def make_pruner(setup: Setup) -> optuna.pruners.BasePruner:
    """Median: a trial is stopped at a validation where it is worse than the median of the
    trials before it at the same point (from the second, once `startup_trials` have finished).
    Halving (successive halving): rungs at validations 2 and 6; at each, only the best third
    of the trials that got there go on. Neither prunes at the first validation: the model is
    still in its warm-up, where small models lead."""
    if setup.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=setup.startup_trials, n_warmup_steps=2)


def settings(setup: Setup, cfg: Config, corpus_sha1: str) -> dict[str, Any]:
    """What every process of a study must agree on, as JSON: the minutes, the corpus's content
    and the base config (less what may differ between machines)."""
    base = {k: v for table in cfg.to_dict().values() for k, v in table.items() if k not in PER_MACHINE}
    agreed: dict[str, Any] = json.loads(json.dumps({"minutes": setup.minutes, "corpus_sha1": corpus_sha1, "base": base}))  # as the storage gives it back
    return agreed


# What Optuna raises decoding a record it did not write: a parameter that is not a number, JSON
# cut short or of another shape, a complete trial without its value (an assertion)
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError)


def read_study(study: optuna.Study, name: str, shown: str, mine: dict[str, Any]) -> int:
    """Check the study's settings (`check_settings`) and read its trials, as every trial will;
    their count. A record that cannot be decoded (a damaged or hand-edited database) is a
    TuneError here, before a trial runs, rather than an internal error from inside Optuna."""
    try:
        check_settings(study, name, mine)
        return len(study.get_trials(deepcopy=False))
    except UNREADABLE as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise TuneError(
            f"study {name} in {shown} holds a record that cannot be read ({type(e).__name__}: {why}): the database is damaged; "
            "choose another --study or --storage"
        ) from None


def check_settings(study: optuna.Study, name: str, mine: dict[str, Any]) -> None:
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


# ---- what the study holds ------------------------------------------------------------------------


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


def state_name(state: optuna.trial.TrialState) -> str:
    """lstmlm's word for an Optuna TrialState."""
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state.name, str(state.name).lower())


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
