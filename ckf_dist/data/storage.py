"""fsspec access for datasets on any URL (local path, file://, s3://, gs://, memory://).

Storage options come from the caller or from the environment variable
``CKF_STORAGE_OPTIONS`` (a JSON object, e.g. ``{"anon": false}``); credentials are left
to each filesystem's own environment variables (``AWS_*``, ``GOOGLE_*``) and never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from ckf_dist.data.errors import DataError

STORAGE_OPTIONS_ENV = "CKF_STORAGE_OPTIONS"


def storage_options_from_env(extra: dict | None = None) -> dict:
    """Storage options from ``$CKF_STORAGE_OPTIONS`` (JSON) updated with ``extra``."""
    opts: dict[str, Any] = {}
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if raw:
        try:
            opts = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"${STORAGE_OPTIONS_ENV}: not a JSON object ({exc})") from None
        if not isinstance(opts, dict):
            raise DataError(f"${STORAGE_OPTIONS_ENV}: expected a JSON object, got {type(opts).__name__}")
    opts.update(extra or {})
    return opts


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``url``; a clear :class:`DataError` when it cannot be used."""
    if not url:
        raise DataError("empty dataset URL (set data.output)")
    try:
        fs, path = url_to_fs(url, **storage_options_from_env(storage_options))
    except (ImportError, ValueError) as exc:
        raise DataError(f"{url}: cannot open this URL ({exc}); is the filesystem's package (s3fs, gcsfs) installed?") from None
    return fs, path.rstrip("/") or path


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', whatever the filesystem."""
    return posixpath.join(root, *parts)


def unreachable(url: str, exc: BaseException) -> DataError:
    """Wrap a storage failure (no such bucket, refused connection, denied) in a DataError naming the URL."""
    kind = type(exc).__name__
    return DataError(f"{url}: storage unreachable or denied ({kind}: {exc}); check the URL, the bucket, "
                     f"the endpoint (AWS_ENDPOINT_URL) and credentials")


def exists(fs, path: str, url: str) -> bool:
    """``fs.exists`` with storage failures turned into :class:`DataError`."""
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many types; we name the URL
        raise unreachable(url, exc) from None


def read_bytes(fs, path: str, url: str) -> bytes:
    """Whole file as bytes; missing file and storage failures are :class:`DataError`."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"{url}: file not found") from None
    except Exception as exc:  # noqa: BLE001
        raise unreachable(url, exc) from None


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` never holds a partial file (temp file, then move)."""
    tmp = path + ".tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def invalidate(fs) -> None:
    """Drop cached listings (s3fs/gcsfs cache them; another process may have written)."""
    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - not every filesystem caches
        pass
