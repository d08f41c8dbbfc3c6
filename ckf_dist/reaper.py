"""Stop a local Ray cluster when the driver that started it dies.

``ckf train`` without ``train.address`` starts Ray on this machine. When the driver is killed
(SIGKILL, OOM killer, a closed terminal) Ray's head processes go, but its agents and, for a
while, the training workers can outlive it: workers that keep training and uploading steps
nobody will commit, and agents orphaned for good.

The reaper is a small process the driver starts beside the cluster. It holds the read end of
a pipe whose write end only the driver has, and every second records the driver's descendant
processes that belong to Ray (their command line names ray), with their start times. When the
pipe reaches end-of-file without the word ``done`` (the driver died without shutting down), it
sends SIGTERM, then SIGKILL after a grace period, to every recorded process that is still the
same process. A driver that shuts Ray down normally writes ``done`` and the reaper exits without
touching anything. Linux only (it reads ``/proc``); elsewhere :func:`start` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE = 3.0


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a process from a later one with its pid), or None."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_ray(pid: int) -> bool:
    try:
        cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "ray" in cmd


def ray_descendants(root: int) -> dict[int, str]:
    """``{pid: start time}`` of every descendant of ``root`` whose command line names ray."""
    kids, out, todo = _children_map(), {}, [root]
    while todo:
        for child in kids.get(todo.pop(), []):
            todo.append(child)
            started = start_time(child)
            if started is not None and child != os.getpid() and _is_ray(child):
                out[child] = started
    return out


def reap(procs: dict[int, str], grace: float = GRACE) -> int:
    """SIGTERM, then SIGKILL after ``grace`` s, each recorded process still alive as itself; returns how many."""
    alive = [p for p, t in procs.items() if start_time(p) == t]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            alive = [p for p in alive if start_time(p) == procs[p]]
            if not alive:
                break
            time.sleep(0.1)
    return len(procs)


def watch(driver: int, fd: int) -> None:
    """The reaper's loop: record the driver's Ray descendants until the pipe closes, then reap."""
    seen: dict[int, str] = {}
    received = b""
    while True:
        seen.update(ray_descendants(driver))
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        chunk = os.read(fd, 64)
        if chunk:
            received += chunk
            continue
        break                                  # end-of-file: the driver is gone
    if b"done" in received:
        return
    n = reap(seen)
    print(f"[ckf] the driver (pid {driver}) died: stopped {n} Ray process(es) it had started", file=sys.stderr,
          flush=True)


class Reaper:
    """The driver's handle: :meth:`done` when Ray was shut down normally."""

    def __init__(self, proc: subprocess.Popen | None, fd: int | None):
        self.proc, self.fd = proc, fd

    def done(self) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, b"done")
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start() -> Reaper:
    """Start the reaper for this process (call before ``ray.init`` starts a local cluster)."""
    if not sys.platform.startswith("linux"):
        return Reaper(None, None)
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "ckf_dist.reaper", str(os.getpid()), str(read_fd)],
                            pass_fds=(read_fd,), stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(read_fd)
    os.set_inheritable(write_fd, False)        # only this process may hold the write end
    return Reaper(proc, write_fd)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
