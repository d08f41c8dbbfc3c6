"""MovieLens readers: the embedded ml-100k (recbole wheel, atomic files), raw 100k and 1M.

- embedded: ``ml-100k.inter`` / ``ml-100k.item``, tab-separated with typed headers such as
  ``user_id:token``; read as files, recbole is never imported.
- raw 100k: ``u.data`` (user, item, rating, timestamp; tabs) and ``u.item`` (``|``, latin-1).
- raw 1M: ``ratings.dat`` and ``movies.dat`` (``::`` separated, latin-1).
"""

from __future__ import annotations

import fsspec

from ckf_dist.data.errors import BadRecords, DataError, where
from ckf_dist.data.sources.base import Interactions, TableBuilder, iter_lines
from ckf_dist.storage import join


def _fields(line: str, sep: str, n: int, path: str, lineno: int, bad: BadRecords) -> list[str] | None:
    parts = line.split(sep)
    if len(parts) < n:
        bad.bad("missing_field", f"{where(path, lineno)}: expected {n} fields separated by {sep!r}, got {len(parts)}")
        return None
    return parts


def _ratings(b: TableBuilder, path: str, sep: str, encoding: str = "latin-1", skip_header: bool = False) -> None:
    b.files.append(path)
    for lineno, line in iter_lines(path, b.bad, encoding=encoding):
        if skip_header and lineno == 1:
            continue
        parts = _fields(line, sep, 4, path, lineno, b.bad)
        if parts is None:
            continue
        user, item = parts[0].strip(), parts[1].strip()
        if not user or not item:
            b.bad.bad("missing_field", f"{where(path, lineno, 'user_id' if not user else 'item_id')}: empty")
            continue
        r = b.rating(parts[2], path, lineno, "rating")
        t = b.timestamp(parts[3], path, lineno, "timestamp")
        if r is not None and t is not None:
            b.add(user, item, r, t)


def _titles(b: TableBuilder, path: str, sep: str, title_col: int, encoding: str = "latin-1", skip_header: bool = False) -> None:
    for lineno, line in iter_lines(path, b.bad, encoding=encoding):
        if skip_header and lineno == 1:
            continue
        parts = line.split(sep)
        if len(parts) <= title_col:
            b.bad.bad("missing_field", f"{where(path, lineno, 'title')}: missing")
            continue
        b.titles[parts[0].strip()] = parts[title_col].strip()


def _header(path: str, want: dict[str, str]) -> dict[str, int]:
    """Column index of each wanted field in a recbole atomic-file header (``name:type``)."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    cols = {}
    for key, name in want.items():
        if name not in names:
            raise DataError(f"{where(path, 1, name)}: missing from header {header}")
        cols[key] = names.index(name)
    return cols


def read_movielens_embedded(folder: str, bad: BadRecords) -> Interactions:
    """ml-100k from the recbole wheel's atomic files (``ml-100k.inter``, ``ml-100k.item``)."""
    b = TableBuilder("movielens-embedded", bad)
    inter, item = join(folder, "ml-100k.inter"), join(folder, "ml-100k.item")
    cols = _header(inter, {"user": "user_id", "item": "item_id", "rating": "rating", "ts": "timestamp"})
    b.files.append(inter)
    need = max(cols.values()) + 1
    for lineno, line in iter_lines(inter, bad):
        if lineno == 1:
            continue
        parts = _fields(line, "\t", need, inter, lineno, bad)
        if parts is None:
            continue
        r = b.rating(parts[cols["rating"]], inter, lineno, "rating")
        t = b.timestamp(parts[cols["ts"]], inter, lineno, "timestamp")
        if r is not None and t is not None:
            b.add(parts[cols["user"]], parts[cols["item"]], r, t)
    icols = _header(item, {"item": "item_id", "title": "movie_title"})
    for lineno, line in iter_lines(item, bad):
        parts = line.split("\t")
        if lineno > 1 and len(parts) > icols["title"]:
            b.titles[parts[icols["item"]]] = parts[icols["title"]].strip()
    return b.build()


def read_movielens_raw(folder: str, bad: BadRecords, variant: str) -> Interactions:
    """Raw GroupLens files: ``variant`` "100k" (u.data/u.item) or "1m" (ratings.dat/movies.dat)."""
    b = TableBuilder(f"movielens-{variant}", bad)
    if variant == "100k":
        _ratings(b, join(folder, "u.data"), "\t")
        _titles(b, join(folder, "u.item"), "|", 1)
    elif variant == "1m":
        _ratings(b, join(folder, "ratings.dat"), "::")
        _titles(b, join(folder, "movies.dat"), "::", 1)
    else:
        raise DataError(f"unknown MovieLens variant {variant!r} (100k or 1m)")
    return b.build()
