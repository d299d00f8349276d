"""The `lstmlm` command line: one module per command, registered in `app.py`.

A command reads its options (the shared ones are declared once in `options.py`), calls one
library function, and renders what it returns (`console.py`); `errors.py` is the one place
that turns exceptions into one line and an exit code. The library is imported inside the
commands, so `lstmlm --help` and `lstmlm download` start without loading torch.
"""

from .app import app, main

__all__ = ["app", "main"]
