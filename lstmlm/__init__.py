"""lstmlm: a command-line trainer for character-level LSTM language models, on PyTorch."""

__version__ = "0.1.0"
