"""Writer leases in storage: one ``ckf prepare`` per dataset folder, one ``ckf train`` per run.

A lease is a small JSON object beside the folder it guards (``<parent>/.<name>.ckf-lease``),
so it works wherever the data lives (local disk, s3://, gs://) and survives the writer's own
clean-up of the folder. It names its holder (host, pid, command, start time) and an expiry
that a heartbeat thread pushes forward every ``ttl / 3`` seconds while the writer runs.

Acquire: read the lease; a live one held by someone else is refused with a message naming
the holder. An absent, expired, or same-host-dead-pid lease is taken:
- on S3, atomically, with S3's conditional writes: an absent lease is created only if it is
  still absent (``If-None-Match: *``) and a stale one replaced only if it is still the version
  read (``If-Match: <ETag>``); each heartbeat rewrites it only if it is still ours. Of two
  writers racing, exactly one write lands; the other is refused with the winner named, and a
  writer whose heartbeat finds another version has lost the lease;
- elsewhere (local disk, other stores), by writing our own and reading it back after a short
  settle time: of two writers racing, only the one whose write landed last sees its own token
  and proceeds (best-effort where the store has no conditional write: the settle time must
  exceed the gap between a racer's read and write, a few requests).
A writer that finds its lease taken over stops before it commits (:meth:`check`).
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid

from ckf_dist.errors import StorageError
from ckf_dist.storage import guarded, open_url, url_of, write_bytes_atomic

LEASE_TTL_ENV = "CKF_LEASE_TTL"
DEFAULT_TTL = 120.0          # seconds a lease outlives its last heartbeat
SETTLE = 0.3                 # seconds between writing a lease and reading it back


def _ttl() -> float:
    raw = os.environ.get(LEASE_TTL_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_TTL
    except ValueError:
        raise StorageError(f"${LEASE_TTL_ENV}: expected seconds, got {raw!r}") from None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:                     # no pid recorded: never signal a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def _conditional_puts() -> bool:
    """Whether the installed botocore sends S3's conditional PutObject headers (If-None-Match,
    If-Match: botocore 1.35.68 and later); without them the lease falls back to read-back."""
    global _CONDITIONAL
    if _CONDITIONAL is None:
        try:
            import botocore.session

            members = botocore.session.get_session().get_service_model("s3").operation_model("PutObject").input_shape.members
            _CONDITIONAL = "IfMatch" in members and "IfNoneMatch" in members
        except Exception:  # noqa: BLE001 - no botocore, or a model without the operation
            _CONDITIONAL = False
    return _CONDITIONAL


_CONDITIONAL: bool | None = None


class Lease:
    """An exclusive, expiring writer lease on the folder at ``url`` (a context manager)."""

    def __init__(self, url: str, what: str, ttl: float | None = None):
        self.url, self.what = url, what
        self.ttl = _ttl() if ttl is None else ttl
        self.fs, path = open_url(url)
        parent, name = posixpath.split(path.rstrip("/"))
        self.parent = parent
        self.path = posixpath.join(parent, f".{name}.ckf-lease") if parent and name else ""
        self.lease_url = url_of(self.fs, self.path) if self.path else ""
        self.token = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
                       "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
                       "started": time.time(), "token": self.token}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.conditional = protocol in ("s3", "s3a") and _conditional_puts()    # If-None-Match / If-Match
        self.etag: str | None = None                        # the version of the lease we wrote last

    # ------------------------------------------------------------------ storage
    def _read(self) -> dict | None:
        with guarded(self.lease_url):
            try:
                raw = self.fs.cat_file(self.path)
            except FileNotFoundError:
                return None
        try:
            return json.loads(raw)
        except ValueError:
            return None            # a torn or foreign file: treat as absent, our write replaces it

    def _write(self) -> None:
        body = dict(self.holder, expires=time.time() + self.ttl)
        with guarded(self.lease_url):
            write_bytes_atomic(self.fs, self.path, json.dumps(body).encode())

    def _version(self) -> str | None:
        """The lease object's current ETag, or None when there is none."""
        with guarded(self.lease_url):
            try:
                return self.fs.info(self.path, refresh=True).get("ETag")
            except FileNotFoundError:
                return None

    def _put_if(self, etag: str | None) -> bool:
        """Write our lease only if the object is still at version ``etag`` (None: still absent);
        False when another write got there first."""
        body = json.dumps(dict(self.holder, expires=time.time() + self.ttl)).encode()
        try:
            condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
            out = self.fs.pipe_file(self.path, body, **condition)
        except FileExistsError:                    # created by someone else meanwhile
            return False
        except OSError as exc:
            if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
                return False                        # rewritten by someone else meanwhile
            with guarded(self.lease_url):
                raise
        self.etag = out.get("ETag") if isinstance(out, dict) else None
        if self.etag is None:
            self.etag = self._version()
        return True

    def _is_stale(self, lease: dict) -> bool:
        if float(lease.get("expires", 0)) < time.time():
            return True
        return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1)))

    def _refuse(self, lease: dict) -> StorageError:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started", 0))))
        left = max(0.0, float(lease.get("expires", 0)) - time.time())
        return StorageError(
            f"{self.url}: locked by another {lease.get('what', 'writer')} (host {lease.get('host')}, pid "
            f"{lease.get('pid')}, since {since}: {lease.get('command', '?')}); wait for it to finish, or if it "
            f"died, for its lease to expire in {left:.0f}s (or delete {self.lease_url})")

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> Lease:
        if not self.path:             # a bucket root has no parent to hold the lease beside it
            print(f"[ckf] warning: {self.url} is a bucket root; concurrent writers are not detected", flush=True)
            return self
        version = self._version() if self.conditional else None      # before the content: see _put_if
        current = self._read()
        if current and current.get("token") != self.token and not self._is_stale(current):
            raise self._refuse(current)
        if self.conditional:
            if not self._put_if(version):
                raise self._refuse(self._read() or {})
        else:
            with guarded(self.lease_url):
                self.fs.makedirs(self.parent, exist_ok=True)     # a fresh clone has no runs/data/ yet
            self._write()
            time.sleep(SETTLE)
            again = self._read()
            if not again or again.get("token") != self.token:
                raise self._refuse(again or {})
        self._thread = threading.Thread(target=self._heartbeat, name="ckf-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.conditional:
                    if not self._put_if(self.etag):
                        self.lost = True       # another version: taken over, the writer must not commit
                        return
                    continue
                current = self._read()
                if not current or current.get("token") != self.token:
                    self.lost = True           # expired and taken over: the writer must not commit
                    return
                self._write()
            except StorageError as exc:        # storage hiccup: try again at the next beat
                print(f"[ckf] warning: lease heartbeat on {self.lease_url} failed: {exc}", flush=True)

    def check(self) -> None:
        """Raise when the lease was lost (it expired and another writer took it): do not commit."""
        if self.lost:
            raise StorageError(f"{self.url}: the writer lease expired and was taken by another {self.what}; "
                               "not committing (raise $CKF_LEASE_TTL if heartbeats are slow)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.path:
            return
        try:
            current = self._read()
            if current and current.get("token") == self.token:
                with guarded(self.lease_url):
                    self.fs.rm_file(self.path)
        except StorageError as exc:
            print(f"[ckf] warning: could not remove the lease {self.lease_url} ({exc}); it expires by itself",
                  flush=True)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
