"""The normalized interaction table every source produces, and careful line reading.

A source yields one :class:`Interactions` table: raw user id, raw item id, rating,
timestamp and (where the source has them) review text and summary, plus item titles.
Raw files are read through fsspec (any URL, gzip inferred from the name); every problem
is reported with the file and line (see :mod:`ckf_dist.data.errors`).
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import math
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckf_dist.data.errors import BadRecords, DataError, where

RATING_RANGE = (1.0, 5.0)


TEXT_CHUNK = 65_536                  # records of text held as Python strings before they become Arrow
PROGRESS_EVERY = 500_000             # records between two progress lines while reading
_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("ckf_read_progress", default=False)


@contextlib.contextmanager
def reading_progress(enabled: bool):
    """Print a line every PROGRESS_EVERY records (count, rate, distinct users and items) while reading."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass
class Interactions:
    """One normalized log in columnar form: per record an int32 user and item code (into the
    raw id lists ``user_ids`` / ``item_ids``, in first-seen order), rating, timestamp and the
    record's text (its summary, else its review text; Arrow, or None when the source has no
    text), plus item titles. No per-record Python object: memory is ~20 bytes per record plus
    the text and the id maps."""

    source: str
    user: np.ndarray               # int32 [n] code into user_ids
    item: np.ndarray               # int32 [n] code into item_ids
    user_ids: list[str]
    item_ids: list[str]
    ratings: np.ndarray            # float32
    timestamps: np.ndarray         # float64, seconds (only the order matters)
    titles: dict[str, str]
    texts: pa.Array | None = None  # large_string [n] ("" when the record has none); None: source has none
    files: list[str] = field(default_factory=list)
    bad: BadRecords = field(default_factory=BadRecords)

    @classmethod
    def from_records(cls, source: str, users, items, ratings, timestamps, titles: dict[str, str] | None = None,
                     texts: list[str] | None = None) -> "Interactions":
        """A table from parallel per-record lists (raw ids as strings); for tests and small logs."""
        b = TableBuilder(source, BadRecords(), with_text=texts is not None)
        for k, (u, i, r, t) in enumerate(zip(users, items, ratings, timestamps)):
            b.add(u, i, float(r), float(t), texts[k] if texts is not None else "")
        b.titles.update(titles or {})
        return b.build()

    def __len__(self) -> int:
        return len(self.user)

    @property
    def users(self) -> list[str]:
        """Raw user id per record (materialized: for tests and small logs)."""
        return [self.user_ids[c] for c in self.user.tolist()]

    @property
    def items(self) -> list[str]:
        """Raw item id per record (materialized: for tests and small logs)."""
        return [self.item_ids[c] for c in self.item.tolist()]

    @property
    def has_text(self) -> bool:
        """True when at least one record carries text."""
        return self.texts is not None and len(self.texts) > 0 and pc.max(pc.binary_length(self.texts)).as_py() > 0


class _Codes:
    """Raw id -> dense int code, in first-seen order."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, raw: str) -> int:
        c = self.code.get(raw)
        if c is None:
            c = self.code[raw] = len(self.names)
            self.names.append(raw)
        return c


class TableBuilder:
    """Accumulates records in compact columns and checks values; ``build()`` returns :class:`Interactions`."""

    def __init__(self, source: str, bad: BadRecords, with_text: bool = False, rating_range=RATING_RANGE):
        self.source, self.bad, self.with_text = source, bad, with_text
        self.lo, self.hi = rating_range
        self._users, self._items = _Codes(), _Codes()
        self.user, self.item = array("i"), array("i")
        self.ratings, self.times = array("f"), array("d")
        self._texts: list[str] = []
        self._text_chunks: list[pa.Array] = []
        self.titles: dict[str, str] = {}
        self.files: list[str] = []
        self._t0 = time.perf_counter()

    def __len__(self) -> int:
        return len(self.user)

    def _report(self) -> None:
        n, dt_s = len(self.user), max(time.perf_counter() - self._t0, 1e-9)
        print(f"    read {n:,} records ({n / dt_s:,.0f}/s), {len(self._users.names):,} users, "
              f"{len(self._items.names):,} items, {self.bad.skipped:,} skipped", flush=True)

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

    def add(self, user, item, rating: float, ts: float, text: str = "") -> None:
        """One good record; ``text``: its summary, else its review text."""
        self.user.append(self._users(str(user)))
        self.item.append(self._items(str(item)))
        self.ratings.append(rating)
        self.times.append(ts)
        if self.with_text:
            self._texts.append(text or "")
            if len(self._texts) >= TEXT_CHUNK:
                self._flush_text()
        if len(self.user) % PROGRESS_EVERY == 0 and _PROGRESS.get():
            self._report()

    def _flush_text(self) -> None:
        if self._texts:
            self._text_chunks.append(pa.array(self._texts, pa.large_string()))
            self._texts = []

    def extend(self, part: Interactions) -> None:
        """Append the records of ``part`` (a :meth:`part` of later lines of the same file), as if
        they had been added here one by one: its ids join the code maps in its first-seen order
        (one lookup per distinct id, not per record) and its skipped records join the counts."""
        before = len(self.user)
        umap = np.array([self._users(name) for name in part.user_ids], dtype=np.int32)
        imap = np.array([self._items(name) for name in part.item_ids], dtype=np.int32)
        self.user.frombytes(umap[part.user].astype(np.int32).tobytes() if len(part) else b"")
        self.item.frombytes(imap[part.item].astype(np.int32).tobytes() if len(part) else b"")
        self.ratings.frombytes(part.ratings.astype(np.float32).tobytes())
        self.times.frombytes(part.timestamps.astype(np.float64).tobytes())
        if self.with_text:
            self._flush_text()
            if part.texts is not None and len(part.texts):
                self._text_chunks.append(part.texts)
        self.titles.update(part.titles)
        self.bad.merge(part.bad)
        if _PROGRESS.get() and len(self.user) // PROGRESS_EVERY > before // PROGRESS_EVERY:
            self._report()

    def part(self) -> Interactions:
        """What was added so far as a (possibly empty) table, for :meth:`extend` elsewhere."""
        return self._table()

    def build(self) -> Interactions:
        if not len(self.user):
            names = ", ".join(self.files) or self.source
            raise DataError(f"{names}: no usable interaction records (empty file, or every record was bad)")
        return self._table()

    def _table(self) -> Interactions:
        texts = None
        if self.with_text:
            self._flush_text()
            texts = pa.concat_arrays(self._text_chunks) if self._text_chunks else pa.array([], pa.large_string())
            self._text_chunks = []
        return Interactions(
            source=self.source, user=np.frombuffer(self.user, dtype=np.int32).copy(),
            item=np.frombuffer(self.item, dtype=np.int32).copy(), user_ids=self._users.names,
            item_ids=self._items.names, ratings=np.frombuffer(self.ratings, dtype=np.float32).copy(),
            timestamps=np.frombuffer(self.times, dtype=np.float64).copy(), titles=self.titles, texts=texts,
            files=self.files, bad=self.bad,
        )


MAX_TIMESTAMP = 4102444800.0          # 2100-01-01 in Unix seconds


def iter_lines(path: str, bad: BadRecords, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, decoded line without newline) for each non-blank line of a (gzip) file.

    Missing and empty files are errors; a truncated/corrupt gzip stream and undecodable
    bytes are bad records (an error, or counted and skipped under the "skip" policy).
    """
    return decode_lines(iter_raw_lines(path, bad), path, bad, encoding)


def iter_raw_lines(path: str, bad: BadRecords) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each line of a (gzip) file; see :func:`iter_lines`."""
    try:
        f = fsspec.open(path, "rb", compression="infer").open()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # noqa: BLE001 - storage errors of many kinds
        raise DataError(f"{path}: cannot open ({type(exc).__name__}: {exc})") from None
    n = 0
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
            yield n, raw
    if not n:
        raise DataError(f"{path}: empty file (no records)")


def decode_lines(lines, path: str, bad: BadRecords, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, text without newline) of each raw line that decodes and is not blank."""
    for n, raw in lines:
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as exc:
            bad.bad("not_utf8", f"{where(path, n)}: bytes not valid {encoding} at offset {exc.start} ({raw[exc.start:exc.start + 4]!r})")
            continue
        text = text.rstrip("\r\n")
        if text.strip():
            yield n, text
