"""The errors a user can act on: one base, one subclass per layer.

The ``ckf`` command prints any :class:`CKFError` as one line (``ckf: error: ...``) and exits
with status 2; every other exception is a bug and shows its traceback. Each subclass also
derives from the builtin it refines (a bad value is a ``ValueError``, a missing resource a
``RuntimeError``), so callers that catch those keep working.
"""

from __future__ import annotations


class CKFError(Exception):
    """A problem the user can fix; the message says what, where (file, line, key, URL) and what to do."""


class ConfigError(CKFError, ValueError):
    """A configuration problem; the message names the key and the source."""


class ResourceError(CKFError, RuntimeError):
    """A packaged resource (embedded data, model, tokenizer) is missing; says what to install or pass."""


class DataError(CKFError, ValueError):
    """Bad input data; the message names the file/URL, line and field."""


class StorageError(DataError):
    """A storage URL that cannot be opened, reached or written; the message names the URL."""


class ModelError(CKFError, ValueError):
    """A backbone or model setting that cannot be used (unknown family, missing folder, bad targets)."""


class CheckpointError(CKFError, RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt or does not match the run."""


class TrainError(CKFError, RuntimeError):
    """A training problem the user can act on (bad DeepSpeed JSON, mismatched resume, failed run)."""


class LaunchError(CKFError, RuntimeError):
    """A cluster submission problem (bad address, unreachable Jobs API, unknown job)."""
