"""lstmlm: a command-line trainer for character-level recurrent language models (the LSTM, the GRU, the plain RNN), on PyTorch."""

__version__ = "0.1.0"
