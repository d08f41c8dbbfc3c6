"""One way to reach storage: URL -> fsspec filesystem, atomic writes, storage failures named.

Every URL the project reads or writes (datasets, checkpoints, raw logs) goes through
:func:`open_url`: a local path stays a plain absolute path; ``file://``, ``s3://``, ``gs://``
and ``memory://`` go to their fsspec filesystem. Storage options come from the caller and
from ``$CKF_STORAGE_OPTIONS`` (a JSON object, e.g. ``{"anon": false}``), the same for the
pre-flight checks of the driver and for the workers. Credentials are left to each
filesystem's own environment variables (``AWS_*``, ``GOOGLE_*``) and never logged.

Atomic writes: :func:`write_bytes_atomic` on any filesystem (temp object, then move), and
:func:`atomic_file` / :func:`atomic_dir` for local files and folders (written under a temp
name beside the target, then renamed), so a reader never sees a partial artefact.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ckf_dist.errors import StorageError

STORAGE_OPTIONS_ENV = "CKF_STORAGE_OPTIONS"
# Seconds one storage request may wait for a connection or for data. A request that times out
# (or cannot connect) is tried again by the storage library, STORAGE_ATTEMPTS times in all, so a
# hung server fails an operation after about STORAGE_ATTEMPTS x the timeout instead of never.
STORAGE_TIMEOUT_ENV = "CKF_STORAGE_TIMEOUT"
DEFAULT_STORAGE_TIMEOUT = 60.0
STORAGE_ATTEMPTS = 5        # s3fs's own retry count (S3FileSystem.retries); gcsfs gets the same
_S3_BOUNDED = False
# fsspec backends that ship separately: protocol -> what to install
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def _bound_s3_waits() -> None:
    """Process-wide fixes so that s3 requests cannot wait forever (idempotent).

    - botocore adds ``Expect: 100-continue`` to uploads, and aiobotocore waits for the server's
      ``100 Continue`` with no timeout at all, so an upload to a server that accepted the
      connection but hangs waits forever, whatever the read timeout. The handler is removed:
      the body is sent at once and the read timeout bounds the wait.
    - A refused connection is made retryable by s3fs (``add_retryable_error``), like a timeout.
    """
    global _S3_BOUNDED
    if _S3_BOUNDED:
        return
    try:
        import botocore.handlers as handlers
        from botocore.exceptions import EndpointConnectionError
        from s3fs.core import add_retryable_error
    except ImportError:
        return
    handlers.BUILTIN_HANDLERS[:] = [h for h in handlers.BUILTIN_HANDLERS
                                    if not (len(h) > 1 and h[1] is handlers.add_expect_header)]
    add_retryable_error(EndpointConnectionError)
    _S3_BOUNDED = True


def _s3_class():
    """s3fs's filesystem with :func:`_bound_s3_waits` applied in every process that uses it.

    Registered for ``s3://`` and ``s3a://``: an instance pickled to a Ray worker or Ray Train's
    controller (the checkpoint upload filesystem) imports this module when it is rebuilt there,
    so the fix reaches processes that never import ckf_dist themselves.
    """
    from s3fs import S3FileSystem as Base

    class BoundedS3FileSystem(Base):
        async def set_session(self, refresh=False, kwargs={}):   # noqa: B006 - s3fs's signature
            _bound_s3_waits()
            return await super().set_session(refresh=refresh, kwargs=kwargs)

    BoundedS3FileSystem.__module__, BoundedS3FileSystem.__qualname__ = __name__, "BoundedS3FileSystem"
    return BoundedS3FileSystem


def __getattr__(name: str):
    if name == "BoundedS3FileSystem":       # built on first use (s3fs is imported only when needed)
        cls = _s3_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def _register_s3() -> None:
    try:
        import fsspec
        for protocol in ("s3", "s3a"):
            fsspec.register_implementation(protocol, f"{__name__}.BoundedS3FileSystem", clobber=True)
    except ImportError:
        pass


_register_s3()


def storage_options_from_env(extra: dict | None = None) -> dict:
    """Storage options from ``$CKF_STORAGE_OPTIONS`` (JSON) updated with ``extra``."""
    opts: dict[str, Any] = {}
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if raw:
        try:
            opts = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageError(f"${STORAGE_OPTIONS_ENV}: not a JSON object ({exc})") from None
        if not isinstance(opts, dict):
            raise StorageError(f"${STORAGE_OPTIONS_ENV}: expected a JSON object, got {type(opts).__name__}")
    opts.update(extra or {})
    return opts


def storage_timeout() -> float:
    """The per-request timeout in seconds (``$CKF_STORAGE_TIMEOUT``, default 60)."""
    raw = os.environ.get(STORAGE_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_STORAGE_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"${STORAGE_TIMEOUT_ENV}: expected seconds, got {raw!r}") from None
    if value <= 0:
        raise StorageError(f"${STORAGE_TIMEOUT_ENV}: must be > 0 seconds, got {raw!r}")
    return value


def _with_timeouts(protocol: str, opts: dict) -> dict:
    """Bounded waits for object stores from the libraries' own settings; a user's values are kept.

    s3fs retries timed-out (and, see :func:`_bound_s3_waits`, refused) requests itself
    (``S3FileSystem.retries``, with backoff) and passes ``config_kwargs`` to botocore's ``Config``:
    a connect and a read timeout, and one attempt per s3fs try so the two retry loops do not
    multiply. gcsfs takes ``timeout`` per request.
    """
    timeout = storage_timeout()
    if protocol in ("s3", "s3a"):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("connect_timeout", min(timeout, 10.0))
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        opts = dict(opts, config_kwargs=config)
    elif protocol in ("gs", "gcs"):
        opts = dict(opts)
        opts.setdefault("timeout", timeout)
    return opts


def storage_exceptions() -> tuple[type[BaseException], ...]:
    """Exception types that mean "storage failed" (network, timeouts, credentials, denials)."""
    types: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        import botocore.exceptions as bce
        types += [bce.BotoCoreError, bce.ClientError]
    except ImportError:
        pass
    try:
        import aiohttp
        types.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(types)


@contextlib.contextmanager
def guarded(url: str) -> Iterator[None]:
    """Turn a storage failure inside the block into a :class:`StorageError` naming ``url``.

    A missing file stays a ``FileNotFoundError`` (callers decide what absence means) and the
    project's own errors pass through untouched.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except storage_exceptions() as exc:
        raise unreachable(url, exc) from None


def is_local(url: str) -> bool:
    """A plain local path (no ``scheme://``)."""
    return "://" not in url


def open_url(url: str, storage_options: dict | None = None):
    """``(filesystem, path inside it)`` for ``url``; a :class:`StorageError` naming the URL when it cannot be used."""
    from fsspec.core import url_to_fs

    if not url:
        raise StorageError("empty storage URL")
    target = os.path.abspath(os.path.expanduser(url)) if is_local(url) else url
    protocol = "file" if is_local(url) else url.split("://", 1)[0]
    try:
        fs, path = url_to_fs(target, **_with_timeouts(protocol, storage_options_from_env(storage_options)))
    except (ImportError, ValueError) as exc:
        if protocol in _BACKENDS:
            hint = f"install {_BACKENDS[protocol]} (pip install {_BACKENDS[protocol]})"
        elif "not known" in str(exc):
            hint = "use a local path or file://, s3://, gs://, memory:// (any protocol fsspec knows)"
        else:
            hint = "is the filesystem's package installed?"
        raise StorageError(f"{url}: cannot open this URL ({exc}); {hint}") from None
    return fs, path.rstrip("/") or path


def pyarrow_filesystem(url: str):
    """``(pyarrow filesystem or None, path)`` for Ray's ``RunConfig``: local paths stay native."""
    import pyarrow.fs as pafs

    fs, path = open_url(url)
    if is_local(url) or url.startswith("file://"):
        return None, path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def url_of(fs, path: str) -> str:
    """The URL of ``path`` on ``fs`` (a plain path for the local filesystem)."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', whatever the filesystem."""
    return posixpath.join(root, *parts)


def unreachable(url: str, exc: BaseException) -> StorageError:
    """Wrap a storage failure (no such bucket, refused connection, denied) in an error naming the URL."""
    kind = type(exc).__name__
    detail = " ".join(str(exc).split()) or kind
    if "credential" in f"{kind} {detail}".lower():
        hint = "set credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or GOOGLE_APPLICATION_CREDENTIALS)"
    elif "timeout" in f"{kind} {detail}".lower():
        hint = (f"the server did not answer within {storage_timeout():g}s x {STORAGE_ATTEMPTS} attempts "
                f"(${STORAGE_TIMEOUT_ENV} sets the per-request timeout)")
    else:
        hint = "check the URL, the bucket, the endpoint (AWS_ENDPOINT_URL) and credentials"
    return StorageError(f"{url}: storage unreachable or denied ({kind}: {detail}); {hint}")


def exists(fs, path: str, url: str) -> bool:
    """``fs.exists`` with storage failures turned into :class:`StorageError`."""
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many types; we name the URL
        raise unreachable(url, exc) from None


def read_bytes(fs, path: str, url: str) -> bytes:
    """Whole file as bytes; a missing file and storage failures are :class:`StorageError`."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{url}: file not found") from None
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


# --------------------------------------------------------------------------- local atomic writes
def _temp_beside(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; when the block ends without error it replaces ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = True,
               validate: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; when the block ends without error it becomes ``target``.

    ``validate(tmp)`` runs first and may raise to keep a bad result out. ``replace=True`` puts the
    new folder in place of an existing one; ``replace=False`` keeps an existing ``target`` (another
    process finished first) and drops the new one. The temp folder never outlives the block.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    tmp.mkdir()
    try:
        yield tmp
        if validate is not None:
            validate(tmp)
        if replace and target.exists():
            old = _temp_beside(target)
            os.replace(target, old)          # the old folder moves aside in one step, then goes
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if replace or not target.exists():
                raise                        # keep=False and someone else's folder is in place: ours goes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (``flock`` on ``path``), held for the block.

    One-time conversions into a shared cache take it, so concurrent workers wait for the
    first one instead of converting side by side. Where ``flock`` is missing it is a no-op.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:            # not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
