"""Helpers the tests share, one module each: loopback fault servers (loopback), the command line
in and out of process (cli), a serve process (serving), small data and models (tiny), the
references results are held to (references), a GPU's constraints on a CPU (on_a_cpu), provoked
faults (faults). conftest.py keeps the fixtures."""
