"""`lstmlm tune`: a study of real trainings on Optuna, each sampled, pruned on its validation
curve, and stored in a database that several processes (and machines) share.

    space     SPACE: the config fields searched, their ranges, a trial's settings sampled
    storage   the database (runs/tune-STUDY.db, or any SQLAlchemy URL), its heartbeat, Optuna's warnings
    study     open_study: the study made or joined (with the same settings); its best trial at the end
    trials    run_study: trials one after another, as events (TrialStarted, TrialEvaluated,
              TrialEnded, then StudyEnded); at the end the best trial's config written as TOML

A trial is `lstmlm train` of the base config (a --config file or the defaults, with the options
given fixed) and the rest of SPACE sampled by Optuna's TPE, for --minutes. It validates
VALIDATIONS times along its minutes and reports each loss to Optuna as step 1, 2, …: a step is a
fraction of the time, so trials of any speed are compared at the same point of their budget.
When the pruner says so, the trainer is stopped through its one stop path (`should_stop`) and
the trial is pruned. A trial's value is its best validation loss in nats per token: the model
in its run's best.pt.

Optuna and not a hand-written search: TPE, the median and successive-halving pruners, and an
RDB storage that processes share safely (the constant liar spreads trials run at once) are a
well-kept library's work. Trials are asked and told here, so that a trial is a generator of
events like a training; Optuna beats a trial's heartbeat only inside `study.optimize`, so the
loop beats it itself, and a trial whose process died (kill -9, a lost machine) is failed by
the next process to ask for one after GRACE_S.

Optuna is imported first, here, once for the package (the submodules' own imports then find it
loaded): without it, importing `lstmlm.tune` is a TuneError that says how to install it. The
storage's timings (HEARTBEAT_S, GRACE_S) are `tune.storage`'s.
"""

from ..errors import TuneError

EXTRA_HINT = "lstmlm tune needs Optuna: pip install 'lstmlm[tune]'"

try:
    import optuna  # noqa: F401  (the submodules' own imports of it then find it loaded)
except ImportError:
    raise TuneError(EXTRA_HINT) from None

from .space import SPACE, Dimension, search_space  # noqa: E402
from .storage import Heartbeat, hide_password, open_storage  # noqa: E402
from .study import Best, Setup, Study, continue_command, open_study  # noqa: E402
from .trials import VALIDATIONS, StudyEnded, TrialEnded, TrialEvaluated, TrialStarted, TuneEvent, run_study  # noqa: E402

__all__ = [
    "EXTRA_HINT",
    "SPACE",
    "VALIDATIONS",
    "Best",
    "Dimension",
    "Heartbeat",
    "Setup",
    "Study",
    "StudyEnded",
    "TrialEnded",
    "TrialEvaluated",
    "TrialStarted",
    "TuneEvent",
    "continue_command",
    "hide_password",
    "open_storage",
    "open_study",
    "run_study",
    "search_space",
]
