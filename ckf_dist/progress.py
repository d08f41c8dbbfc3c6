"""Progress output of the stages: status lines and progress bars, both off with ``--quiet``."""

from __future__ import annotations

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
