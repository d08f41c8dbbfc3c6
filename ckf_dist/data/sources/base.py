"""The normalized interaction table every source produces, and careful line reading.

A source yields one :class:`Interactions` table: raw user id, raw item id, rating,
timestamp and (where the source has them) review text and summary, plus item titles.
Raw files are read through fsspec (any URL, gzip inferred from the name); every problem
is reported with the file and line (see :mod:`ckf_dist.data.errors`).
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np

from ckf_dist.data.errors import BadRecords, DataError, where

RATING_RANGE = (1.0, 5.0)


@dataclass
class Interactions:
    """One normalized log: parallel columns plus item titles (raw item id -> title)."""

    source: str
    users: list[str]
    items: list[str]
    ratings: np.ndarray            # float32
    timestamps: np.ndarray         # float64, seconds (only the order matters)
    titles: dict[str, str]
    reviews: list[str] | None = None     # review text per record ("" when absent); None: source has none
    summaries: list[str] | None = None
    files: list[str] = field(default_factory=list)
    bad: BadRecords = field(default_factory=BadRecords)

    def __len__(self) -> int:
        return len(self.users)

    @property
    def has_text(self) -> bool:
        """True when at least one record carries review text or a summary."""
        return any(self.reviews or ()) or any(self.summaries or ())


class TableBuilder:
    """Accumulates records and checks ratings; ``build()`` returns :class:`Interactions`."""

    def __init__(self, source: str, bad: BadRecords, with_text: bool = False, rating_range=RATING_RANGE):
        self.source, self.bad, self.with_text = source, bad, with_text
        self.lo, self.hi = rating_range
        self.users: list[str] = []
        self.items: list[str] = []
        self.ratings: list[float] = []
        self.times: list[float] = []
        self.reviews: list[str] = []
        self.summaries: list[str] = []
        self.titles: dict[str, str] = {}
        self.files: list[str] = []

    def rating(self, value, path: str, line: int, name: str) -> float | None:
        """``value`` as a float in the rating range, or None after reporting a bad record."""
        if isinstance(value, (bool, list, dict)):          # JSON true is not 1, a list is not a number
            self.bad.bad("bad_rating", f"{where(path, line, name)}: not a number: {value!r}")
            return None
        try:
            r = float(value)
        except (TypeError, ValueError):
            self.bad.bad("bad_rating", f"{where(path, line, name)}: not a number: {value!r}")
            return None
        if math.isnan(r) or not self.lo <= r <= self.hi:
            self.bad.bad("rating_out_of_range", f"{where(path, line, name)}: rating {value!r} outside [{self.lo:g}, {self.hi:g}]")
            return None
        return r

    def number(self, value, path: str, line: int, name: str) -> float | None:
        """``value`` as a finite float, or None after reporting a bad record (booleans and lists are bad)."""
        if not isinstance(value, (bool, list, dict)):
            try:
                x = float(value)
                if math.isfinite(x):
                    return x
            except (TypeError, ValueError):
                pass
        self.bad.bad("bad_number", f"{where(path, line, name)}: not a number: {value!r}")
        return None

    def timestamp(self, value, path: str, line: int, name: str) -> float | None:
        """``value`` as Unix seconds between 1970 and 2100, or None after reporting a bad record."""
        x = self.number(value, path, line, name)
        if x is not None and not 0.0 <= x <= MAX_TIMESTAMP:
            self.bad.bad("timestamp_out_of_range", f"{where(path, line, name)}: timestamp {value!r} is not Unix "
                                                   f"seconds between 1970 and 2100")
            return None
        return x

    def identifier(self, value, path: str, line: int, name: str) -> str | None:
        """A user or item id (a string or an integer), or None after reporting a bad record."""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.bad.bad("bad_id", f"{where(path, line, name)}: expected a string or integer id, "
                                   f"got {type(value).__name__} {str(value)[:40]!r}")
            return None
        return str(value)

    def add(self, user, item, rating: float, ts: float, review: str = "", summary: str = "") -> None:
        self.users.append(str(user))
        self.items.append(str(item))
        self.ratings.append(rating)
        self.times.append(ts)
        if self.with_text:
            self.reviews.append(review or "")
            self.summaries.append(summary or "")

    def build(self) -> Interactions:
        if not self.users:
            names = ", ".join(self.files) or self.source
            raise DataError(f"{names}: no usable interaction records (empty file, or every record was bad)")
        return Interactions(
            source=self.source, users=self.users, items=self.items,
            ratings=np.asarray(self.ratings, dtype=np.float32), timestamps=np.asarray(self.times, dtype=np.float64),
            titles=self.titles, reviews=self.reviews if self.with_text else None,
            summaries=self.summaries if self.with_text else None, files=self.files, bad=self.bad,
        )


MAX_TIMESTAMP = 4102444800.0          # 2100-01-01 in Unix seconds


def iter_lines(path: str, bad: BadRecords, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, decoded line without newline) for each non-blank line of a (gzip) file.

    Missing and empty files are errors; a truncated/corrupt gzip stream and undecodable
    bytes are bad records (an error, or counted and skipped under the "skip" policy).
    """
    try:
        f = fsspec.open(path, "rb", compression="infer").open()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - storage errors of many kinds
        raise DataError(f"{path}: cannot open ({type(exc).__name__}: {exc})") from None
    n = 0
    seen_any = False
    with f:
        while True:
            try:
                raw = f.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
                bad.bad("truncated_file", f"{path}: truncated or corrupt compressed file after line {n} ({exc})")
                return
            if not raw:
                break
            n += 1
            seen_any = True
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as exc:
                bad.bad("not_utf8", f"{where(path, n)}: bytes not valid {encoding} at offset {exc.start} ({raw[exc.start:exc.start + 4]!r})")
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield n, text
    if not seen_any:
        raise DataError(f"{path}: empty file (no records)")
