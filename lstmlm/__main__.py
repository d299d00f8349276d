"""`python -m lstmlm` is `lstmlm`."""

from .cli import main

main()
