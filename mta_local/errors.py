"""Exceptions raised by the library; the CLI turns each into a one-line message."""


class MtaError(Exception):
    """Base class for errors a user can fix. The message ends with what to do."""


class HistoryError(MtaError):
    """A history file is missing, unreadable or contains an invalid history item."""


class ModelNotFoundError(MtaError):
    """A base model or embedder could not be found locally."""


class UnsupportedModelError(MtaError):
    """A base model, adapter config or architecture the exporter cannot reproduce."""


class BankError(MtaError):
    """A bank is missing, invalid, or was built for another base model or embedder."""


class ProfileError(MtaError):
    """A profile is missing or incomplete."""


class AdapterNotAppliedError(MtaError):
    """llama.cpp rejected the adapter or its output shows the adapter had no effect."""


class ExportError(MtaError):
    """Export folder that cannot be created or written."""


class VerificationError(MtaError):
    """An exported adapter failed a fidelity check of ``mta-local verify``."""


class LeakageError(MtaError):
    """Evaluation users or query texts overlap the bank's users or training data."""


class EvalError(MtaError):
    """An evaluation run's options or its output folder are inconsistent."""
