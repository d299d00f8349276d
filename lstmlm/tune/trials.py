"""A study's trials, one after another, as events: each asked of Optuna, sampled, trained as
`lstmlm train` trains (training.plan → training.start → Trainer.run), its
validations reported to Optuna and pruned on its word, and told to Optuna however it ends; at
the end the study's best trial's config written as TOML."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from ..atomic import check_output
from ..config import Config
from ..errors import CorpusError, DeviceError, TrainingError, TuneError
from ..events import Evaluated, Started
from ..runs import RunExists
from ..training import plan as plan_training
from ..training import start as start_training
from .space import SPACE, sample
from .storage import GRACE_S, Heartbeat, quiet
from .study import Best, Setup, Study, best_trial, state_name, states, write_best

VALIDATIONS = 8  # per trial, evenly over its minutes: the points its curve is pruned at
TRIAL_VAL_TOKENS = 50_000  # a trial validates on this fixed sample (unless --val-tokens): 8 validations cost little of its time
FAILURES_IN_A_ROW = 3  # trials failing one after another: the study stops (a disk full, a machine too small)

# What a trial sets for itself (unless an option gives it) and the best trial's config does not
# keep: `lstmlm train` validates, checkpoints and samples at its own cadences.
TRIAL_ONLY = ("eval_every", "checkpoint_every", "sample_every", "val_tokens")


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
class StudyEnded:
    reason: str  # "trials" (this process ran its trials) | "interrupted"
    best: Best | None  # the study's best complete trial, whichever process ran it
    output: Path | None  # where its config was written
    states: dict[str, int]  # the study's trials by state: complete, pruned, failed, running


TuneEvent = TrialStarted | TrialEvaluated | TrialEnded | StudyEnded


# ---- the study's trials --------------------------------------------------------------------------


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


# ---- one trial -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """How a trial's training went, as Optuna is to be told."""

    state: str  # complete | pruned | failed
    settings: dict[str, Any]  # the searched fields' values: sampled, then as the config has them
    best: float | None = None  # its best validation loss, nats per token
    parameters: int | None = None
    reason: str = ""  # why it was pruned or failed


def run_trial(study: Study, should_stop: Callable[[], bool]) -> Generator[TuneEvent, None, TrialEnded]:
    """Ask Optuna for a trial, train it, tell Optuna how it went. Whatever ends it — the
    pruner, Ctrl-C, an error — it is told: never left running."""
    trial = _ask(study)
    run = f"{study.name}-trial-{trial.number}"
    start = time.perf_counter()
    try:
        params = sample(study.space, study.base, trial)
        trial.set_user_attr("run", run)
        yield TrialStarted(trial.number, run, params)
        trained = yield from train_trial(study, trial, run, params, should_stop)
    except RunExists:
        _tell(study, trial, "failed")
        here = f"run {run} already exists in {study.runs_dir}"
        raise TuneError(f"{here}: a study named {study.name} ran here with another storage; choose another --study") from None
    except BaseException:  # Ctrl-C a second time, an error in the library, the generator closed
        _tell(study, trial, "failed")
        raise
    state = _tell(study, trial, trained.state, trained.best)
    reason = trained.reason if state == trained.state else f"{state} by another process (no heartbeat for {GRACE_S} s)"
    minutes = (time.perf_counter() - start) / 60
    return TrialEnded(trial.number, state, trained.best, trained.parameters, minutes, run, trained.settings, reason)


def train_trial(study: Study, trial: optuna.Trial, run: str, params: dict[str, Any], should_stop: Callable[[], bool]) -> Generator[TuneEvent, None, Trained]:
    """One trial's training, as `lstmlm train` runs it, its validations reported to Optuna; what
    became of it. A training that diverges is pruned, so that TPE learns this corner is bad (a
    failed trial teaches it nothing); one too large for the machine, or with batches too long
    for the text, is failed: the trial's own fault, not the study's."""
    settings, best, parameters, step, prune = dict(params), None, None, 0, False
    try:
        plan = plan_training(study.runs_dir, run, {**trial_overrides(study.setup), **params}, study.setup.config_file, default_recipe=False)
        settings = {d.key: plan.config.value(d.key) for d in SPACE}  # sampled or fixed
        trial.set_user_attr("config", best_config(plan.config, study.base, study.setup.fixed).to_dict())
        heartbeat = Heartbeat(study.storage, study.name, trial.number)

        def stop() -> bool:  # the pruner's word, as it stands when the trainer asks
            return prune or should_stop()

        with start_training(plan) as training:
            for event in training.run(stop):
                heartbeat()
                if isinstance(event, Started):
                    parameters = event.num_params
                elif isinstance(event, Evaluated):
                    step += 1
                    best = event.val_loss if best is None else min(best, event.val_loss)
                    trial.report(event.val_loss, step)
                    prune = prune or trial.should_prune()
                    yield TrialEvaluated(trial.number, step, event.val_loss, prune)
    except TrainingError as e:
        return Trained("pruned", settings, best, parameters, f"diverged: {e}")
    except (DeviceError, CorpusError) as e:
        return Trained("failed", settings, best, parameters, str(e))
    if prune:
        return Trained("pruned", settings, best, parameters, f"at validation {step} of {VALIDATIONS}")
    if should_stop():
        return Trained("failed", settings, best, parameters, "interrupted")
    return Trained("complete", settings, best, parameters)


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


def _ask(study: Study) -> optuna.Trial:
    """A new trial, after failing those whose process has stopped beating (kill -9, a lost machine)."""
    with quiet():
        optuna.storages.fail_stale_trials(study.optuna_study)
        return study.optuna_study.ask()


def _tell(study: Study, trial: optuna.Trial, state: str, value: float | None = None) -> str:
    """Tell Optuna how the trial ended; the state it has in the storage after that (a trial
    failed meanwhile by another process, for a heartbeat it missed, stays failed)."""
    TrialState = optuna.trial.TrialState
    told = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[state]
    frozen = study.optuna_study.tell(trial, value if told == TrialState.COMPLETE else None, state=told, skip_if_finished=True)
    return state_name(frozen.state)
