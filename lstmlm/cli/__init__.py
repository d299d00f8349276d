"""The `lstmlm` command line: one module per command, registered in `app.py`.

A command reads its options (the shared ones are declared once in `options.py`), calls one
library function, and renders what it returns (`console.py`); `errors.py` is the one place
that turns exceptions into one line and an exit code. The library is imported inside the
commands, so `lstmlm --help` and `lstmlm download` start without loading torch.
"""

import contextlib
import signal
import sys
from types import FrameType


def _terminated(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM before a command's own handler (`errors.terminable`): nothing is made yet."""
    sys.stderr.write("error: terminated\n")
    raise SystemExit(128 + signal.SIGTERM)


with contextlib.suppress(ValueError):  # not the main thread (a test's runner): SIGTERM as it was
    signal.signal(signal.SIGTERM, _terminated)  # loading the application: one line, as later, not a silent kill

try:
    from .app import app, main
except KeyboardInterrupt:  # loading the application takes a third of a second: a Ctrl-C then is one line, as later, not a traceback
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(130) from None

__all__ = ["app", "main"]
