"""``ckf jobs list|logs|stop``: inspect and control jobs on a Ray cluster's Jobs API."""

from __future__ import annotations

import sys
import time
from datetime import datetime

from ckf_dist.launch.client import LaunchError, connect, job_not_found, resolve_address
from ckf_dist.launch.follow import TERMINAL, _exit_code, _status_name, follow_job
from ckf_dist.launch.redact import Redactor, local_secret_values


def _when(ms) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _took(start_ms, end_ms) -> str:
    if not start_ms:
        return "-"
    s = int(((end_ms or time.time() * 1000) - start_ms) / 1000)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def list_jobs(address: str | None = None, client=None) -> list[dict]:
    """Submitted jobs, newest first: submission_id, status, run, start, duration, entrypoint."""
    client = client or connect(address)
    rows = []
    for job in client.list_jobs():
        if not job.submission_id:  # drivers started by hand have no submission id to act on
            continue
        meta = job.metadata or {}
        rows.append({
            "submission_id": job.submission_id,
            "status": _status_name(job.status),
            "run": meta.get("ckf_run_name", "-"),
            "start": _when(job.start_time),
            "duration": _took(job.start_time, job.end_time),
            "entrypoint": job.entrypoint,
            "_start_ms": job.start_time or 0,
        })
    rows.sort(key=lambda r: r["_start_ms"], reverse=True)
    for r in rows:
        del r["_start_ms"]
    return rows


def format_jobs(rows: list[dict], width: int = 60) -> str:
    """A fixed-width table of :func:`list_jobs` rows."""
    cols = ["submission_id", "status", "run", "start", "duration", "entrypoint"]
    cells = [[str(r[c]) if c != "entrypoint" or len(str(r[c])) <= width else str(r[c])[: width - 3] + "..."
              for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def job_logs(address: str | None, job_id: str, *, follow: bool = False, tail: int = 0, out=None, err=None,
             client=None) -> int:
    """Print a job's log (masked); with ``follow`` stream it until the job ends and return its
    exit status, else return 0. ``tail`` > 0 prints only the last lines."""
    out, err = out or sys.stdout, err or sys.stderr
    url = resolve_address(address)
    client = client or connect(url)
    redact = Redactor(local_secret_values())
    try:
        if follow:
            return follow_job(client, job_id, redact=redact, out=out, err=err, tail_lines=0, progress=True)
        text = redact(client.get_job_logs(job_id) or "")
    except LaunchError:
        raise
    except Exception as exc:
        raise job_not_found(exc, job_id, url) from None
    if tail > 0:
        text = "\n".join(text.rstrip("\n").splitlines()[-tail:]) + "\n"
    out.write(text)
    out.flush()
    return 0


def stop_job(address: str | None, job_id: str, *, wait: bool = True, timeout: float = 60.0, err=None,
             client=None) -> int:
    """Ask the cluster to stop a job; with ``wait`` poll until it has ended. Returns 0 when the
    job is (now) stopped or had already ended."""
    err = err or sys.stderr
    url = resolve_address(address)
    client = client or connect(url)
    try:
        stopped = client.stop_job(job_id)
        status = _status_name(client.get_job_status(job_id))
    except Exception as exc:
        raise job_not_found(exc, job_id, url) from None
    if not stopped and status in TERMINAL:
        print(f"ckf: job {job_id} had already ended: {status}", file=err)
        return 0
    deadline = time.monotonic() + timeout
    while wait and status not in TERMINAL:
        if time.monotonic() > deadline:
            raise LaunchError(f"job {job_id} on {url} is still {status} {timeout:.0f} s after the stop request")
        time.sleep(0.5)
        status = _status_name(client.get_job_status(job_id))
    print(f"ckf: job {job_id} {status if wait else 'stop requested'}", file=err)
    return 0


def job_status(address: str | None, job_id: str, client=None) -> tuple[str, int | None]:
    """(status, exit status or None while it runs) of one job."""
    url = resolve_address(address)
    client = client or connect(url)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise job_not_found(exc, job_id, url) from None
    status = _status_name(info.status)
    return status, (_exit_code(info) if status in TERMINAL else None)
