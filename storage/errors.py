"""The error hierarchy every layer shares.

Retries are for faults that may go away (a dropped connection, a busy server); they never help with
bad data or bad configuration, so those fail at once.
"""


class GptflowError(Exception):
    """Base of gptflow's own errors: the message is one line that names the file or value at fault."""


class TransientError(GptflowError):
    """A fault that a retry may fix: network errors, 5xx responses, a lock held by another run."""


class DataIntegrityError(GptflowError):
    """Input that is wrong and stays wrong: a corrupt or truncated archive, a checksum mismatch, no data."""


class ConfigError(GptflowError, ValueError):
    """A bad parameter or combination of parameters."""


class StoreError(GptflowError):
    """The store is not in the state an operation needs (a missing version, no `latest`)."""


class DiskFullError(StoreError):
    """No space left where a stage writes. Not retried: only freeing space helps, and a rerun then completes."""


class QualityError(GptflowError):
    """An output that was computed but fails a quality bound (a quantized model that lost too much)."""
