"""The exceptions the library raises; the CLI turns each into one line and exit code 1."""


class LstmlmError(Exception):
    """Base of every error a user can cause; its message is the one line the CLI prints."""


class ConfigError(LstmlmError):
    """An unknown key or an invalid value in a config file or an option."""


class CorpusError(LstmlmError):
    """A corpus that is missing, empty, not UTF-8, binary, or too short."""


class DownloadError(LstmlmError):
    """A download that failed: network, HTTP status, timeout, short transfer, checksum."""


class VocabError(LstmlmError):
    """Characters outside a vocabulary, or a malformed vocabulary file."""


class CheckpointError(LstmlmError):
    """A run or checkpoint that is missing, corrupt, foreign, unsafe or locked."""


class DeviceError(LstmlmError):
    """A device or precision that this machine does not have."""


class WriteError(LstmlmError):
    """A file that could not be written (a full disk, no permission); the message names what it was."""


class TrainingError(LstmlmError):
    """Training that cannot go on: a non-finite loss, an unwritable run directory."""


class ShapeError(LstmlmError, ValueError):
    """An input or state whose shape or dtype does not fit the model."""


class InspectError(LstmlmError):
    """An inspection that cannot be made: empty text, a bad regex, a layer or unit that does not exist."""


class PlotError(LstmlmError):
    """A plot that cannot be drawn: no epochs logged, an unknown image format, matplotlib missing."""


class NothingToPlot(PlotError):
    """A run with neither a finished epoch nor a validation yet: left out beside runs that have one."""


class ServeError(LstmlmError):
    """A server that cannot start: its extra missing, an address that cannot be bound, bad limits."""


class ExportError(LstmlmError):
    """A model that cannot be exported: an unknown format, its extra missing, a runtime that disagrees."""


class TuneError(LstmlmError):
    """A study that cannot run: Optuna missing, a storage that cannot be opened, a study made with other settings, trials that keep failing."""


class TensorBoardError(LstmlmError):
    """TensorBoard logs that cannot be written: the extra missing, a directory that cannot be made."""
