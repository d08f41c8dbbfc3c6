"""Progress output of the stages: status lines and progress bars, both off with ``--quiet``."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator


def log(progress: bool, msg: str) -> None:
    """Print one status line when progress output is on."""
    if progress:
        print(msg, flush=True)


def bar(iterable: Iterable, total: int, desc: str, progress: bool) -> Iterable:
    """``iterable`` with a tqdm bar when progress output is on (plain lines every ~10% without tqdm)."""
    if not progress:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _every_tenth(iterable, total, desc)
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _every_tenth(iterable: Iterable, total: int, desc: str) -> Iterator:
    step = max(1, total // 10)
    for i, x in enumerate(iterable):
        if i % step == 0:
            print(f"  {desc}: {i}/{total}", flush=True)
        yield x


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StageClock:
    """Wall time and peak memory per stage of a command: ``lap(name)`` closes the stage just run."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.stages: dict[str, dict] = {}

    def lap(self, name: str, **extra) -> None:
        """Close stage ``name``; ``extra`` values other than None are recorded with it."""
        now = time.perf_counter()
        self.stages[name] = {"s": round(now - self.last, 3), "rss_gb": round(peak_rss_bytes() / 2**30, 3),
                             **{k: v for k, v in extra.items() if v is not None}}
        self.last = now

    def line(self, name: str) -> str:
        st = self.stages[name]
        return f"{st['s']:.1f}s, total {self.last - self.t0:.1f}s, peak {st['rss_gb']:.2f} GB"

    def summary(self) -> dict[str, dict]:
        return dict(self.stages)
