"""Following a Ray job: stream its log with secrets masked, show progress, report the end.

Logs come from ``JobSubmissionClient.tail_job_logs`` (a websocket); the status is polled
beside it, so a job that dies before writing a line is still noticed. If the stream
breaks, the rest of the log is fetched once the job has ended, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import re
import time

from ckf_dist.launch.redact import Redactor

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_FAILED = 1
EXIT_STOPPED = 143  # 128 + SIGTERM, as a shell reports a terminated command
_STEP = re.compile(r"\bstep\s*[:=]?\s*(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_LOSS = re.compile(r"\bloss\s*[:=]?\s*([-+0-9.eE]+|nan|inf)", re.IGNORECASE)


def _status_name(status) -> str:
    return str(getattr(status, "value", status))


def _elapsed(start: float) -> str:
    s = int(time.monotonic() - start)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Status transitions on stderr, plus (on a terminal) one live line: status, time,
    ``step i/n`` and loss parsed from the trainer's log lines."""

    def __init__(self, job_id: str, out, err, enabled: bool = True, start: float | None = None):
        self.job_id, self.out, self.err = job_id, out, err
        self.enabled = enabled
        self.live = enabled and hasattr(err, "isatty") and err.isatty()
        self.start = time.monotonic() if start is None else start
        self.status = ""
        self.step: tuple[int, int] | None = None
        self.loss = ""
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.err.write("\r\033[K")
            self._drawn = False

    def _draw(self) -> None:
        if not self.live or self.status in TERMINAL:
            return
        parts = [f"[{self.job_id}] {self.status or 'PENDING'} {_elapsed(self.start)}"]
        if self.step:
            i, n = self.step
            parts.append(f"step {i}/{n} ({100 * i // max(n, 1)}%)")
        if self.loss:
            parts.append(f"loss {self.loss}")
        self.err.write("\r\033[K" + " | ".join(parts))
        self.err.flush()
        self._drawn = True

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            if self.enabled:
                self._clear()
                print(f"ckf: job {self.job_id} is {status} [{_elapsed(self.start)}]", file=self.err, flush=True)
        self._draw()

    def log(self, text: str) -> None:
        if not text:
            return
        for m in _STEP.finditer(text):
            self.step = (int(m.group(1)), int(m.group(2)))
        for m in _LOSS.finditer(text):
            self.loss = m.group(1)
        self._clear()
        self.out.write(text)
        self.out.flush()
        self._draw()

    def close(self) -> None:
        self._clear()


async def _follow(client, job_id: str, redact: Redactor, progress: Progress, poll_s: float,
                  stream_grace_s: float = 2.0) -> int:
    """Stream until the job is terminal; returns how many raw log characters were streamed."""
    streamed = 0

    async def stream() -> None:
        nonlocal streamed
        async for chunk in client.tail_job_logs(job_id):
            streamed += len(chunk)
            progress.log(redact.feed(chunk))

    async def poll() -> None:
        failures = 0
        while True:
            try:
                status = _status_name(await asyncio.to_thread(client.get_job_status, job_id))
                failures = 0
            except Exception:  # a busy dashboard: retry for a while before giving up
                failures += 1
                if failures > 30:
                    raise
                await asyncio.sleep(poll_s)
                continue
            progress.set_status(status)
            if status in TERMINAL:
                return
            await asyncio.sleep(poll_s)

    streamer = asyncio.ensure_future(stream())
    await poll()
    try:  # the server closes the log stream shortly after the job ends
        await asyncio.wait_for(streamer, timeout=stream_grace_s)
    except Exception:  # timeout or a broken stream: the remainder is fetched below
        streamer.cancel()
    return streamed


def _exit_code(info) -> int:
    status = _status_name(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    code = getattr(info, "driver_exit_code", None)
    if isinstance(code, int) and code != 0:
        return 128 - code if code < 0 else (code if code < 256 else EXIT_FAILED)
    return EXIT_FAILED


def print_tail(client, job_id: str, redact: Redactor, err, lines: int) -> None:
    """The last ``lines`` lines of the job's log, masked, between rulers on ``err``."""
    try:
        text = redact(client.get_job_logs(job_id) or "")
    except Exception as exc:
        print(f"ckf: could not fetch the log of {job_id}: {exc}", file=err)
        return
    tail = text.rstrip("\n").splitlines()[-lines:] if lines > 0 else []
    if not tail:
        print(f"ckf: job {job_id} wrote no log", file=err)
        return
    print(f"---- last {len(tail)} lines of the log of {job_id} (all of it: ckf jobs logs {job_id}) ----", file=err)
    print("\n".join(tail), file=err)
    print("-" * 40, file=err, flush=True)


def report(client, job_id: str, redact: Redactor, err, tail_lines: int, start: float | None = None) -> int:
    """Print how the job ended (with the log tail unless it succeeded); return its exit status."""
    info = client.get_job_info(job_id)
    status = _status_name(info.status)
    took = f" after {_elapsed(start)}" if start is not None else ""
    code = _exit_code(info)
    if status == "SUCCEEDED":
        print(f"ckf: job {job_id} SUCCEEDED{took}", file=err, flush=True)
        return 0
    message = redact(getattr(info, "message", "") or "").strip().splitlines()
    if message:  # Ray appends the log to its message; we print our own tail instead
        message[0] = message[0].split(", last available logs")[0]
    if tail_lines > 0:
        print_tail(client, job_id, redact, err, tail_lines)
    detail = f" (exit code {info.driver_exit_code})" if getattr(info, "driver_exit_code", None) is not None else ""
    print(f"ckf: job {job_id} {status}{detail}{took}" + (f": {message[0]}" if message else ""), file=err)
    if message and len(message) > 1 and not client.get_job_logs(job_id):
        print("\n".join(message[1:20]), file=err)  # e.g. a runtime_env that failed to install
    err.flush()
    return code


def follow_job(client, job_id: str, *, redact: Redactor | None = None, out, err, tail_lines: int = 50,
               progress: bool = True, start: float | None = None, poll_s: float = 1.0) -> int:
    """Stream the job's log to ``out`` until it ends; return its exit status (0 = SUCCEEDED)."""
    redact = redact or Redactor()
    prog = Progress(job_id, out, err, enabled=progress, start=start)
    try:
        streamed = asyncio.run(_follow(client, job_id, redact, prog, poll_s))
        prog.log(redact.flush())
        full = client.get_job_logs(job_id) or ""
        if len(full) > streamed:  # the stream broke or ended early: print what it missed
            prog.log(redact(full[streamed:]))
    finally:
        prog.close()
    return report(client, job_id, redact, err, tail_lines, start)
