"""Failures no stage wrapped, turned into errors a user can act on (for the ``ckf`` command)."""

from __future__ import annotations

from ckf_dist.errors import CKFError
from ckf_dist.storage import unreachable


def is_storage_failure(exc: BaseException) -> bool:
    """A storage library's network, credential or permission failure."""
    if isinstance(exc, (PermissionError, ConnectionError, TimeoutError)):
        return True
    module = (type(exc).__module__ or "").split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google")


def as_user_error(exc: BaseException) -> CKFError | None:
    """A one-line error for a storage failure that reached the command unwrapped; None for a bug."""
    if is_storage_failure(exc):
        return unreachable("storage", exc)
    return None
