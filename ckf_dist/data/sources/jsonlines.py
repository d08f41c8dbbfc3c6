"""JSON-lines review dumps: Amazon 2014, Amazon 2018 and the Yelp academic dataset.

- Amazon 2014: ``reviews_<Cat>.json.gz`` (reviewerID, asin, overall, unixReviewTime,
  reviewText, summary) and ``meta_<Cat>.json.gz`` whose lines are often Python dict
  literals rather than JSON: parsed with ``ast.literal_eval`` as a fallback (never ``eval``).
- Amazon 2018: the same review fields, strict JSON lines; ``meta_<Cat>.json.gz`` with titles.
- Yelp: ``review.json`` (user_id, business_id, stars, date, text) and ``business.json``
  whose ``name`` becomes the item title.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from fsspec.core import url_to_fs

from ckf_dist.data.errors import BadRecords, DataError, where
from ckf_dist.data.sources.base import Interactions, TableBuilder, decode_lines, iter_lines


def parse_record(text: str, path: str, lineno: int, bad: BadRecords, literal_fallback: bool) -> dict | None:
    """One line as a dict (JSON, or a Python literal when allowed), or None after reporting it."""
    try:
        obj = json.loads(text)
    except RecursionError:
        bad.bad("malformed_json", f"{where(path, lineno)}: JSON nested too deeply")
        return None
    except json.JSONDecodeError as exc:
        obj = None
        if literal_fallback:
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
        if obj is None:
            bad.bad("malformed_json", f"{where(path, lineno)}: malformed JSON ({exc.msg} at column {exc.colno})")
            return None
    if not isinstance(obj, dict):
        bad.bad("malformed_json", f"{where(path, lineno)}: expected a JSON object, got {type(obj).__name__}")
        return None
    return obj


def _required(rec: dict, names: tuple[str, ...], path: str, lineno: int, bad: BadRecords) -> bool:
    for name in names:
        if rec.get(name) in (None, ""):
            bad.bad("missing_field", f"{where(path, lineno, name)}: missing")
            return False
    return True


def _find(path: str, patterns: tuple[str, ...], what: str, exclude: str = "") -> str:
    """``path`` itself if it is a file, else the single file in the folder matching a pattern."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise DataError(f"{path}: not found ({what})")
    if not fs.isdir(p):
        return path
    for pattern in patterns:
        hits = sorted(h for h in fs.glob(f"{p.rstrip('/')}/{pattern}") if not (exclude and h.rsplit("/", 1)[-1].startswith(exclude)))
        if len(hits) > 1:
            raise DataError(f"{path}: several {what} files match {pattern!r}: {hits}; pass the file itself")
        if hits:
            return _full(fs, hits[0])
    raise DataError(f"{path}: no {what} file (looked for {', '.join(patterns)})")


def _full(fs, p: str) -> str:
    """A URL fsspec can open again; plain paths stay plain (clearer error messages)."""
    return p if "file" in fs.protocol else fs.unstrip_protocol(p)


def _text(value) -> str:
    return " ".join(str(value).split()) if value else ""


@dataclass(frozen=True)
class ReviewFormat:
    """Where a review dump keeps its fields: (user, item, rating, time) names, the text fields in
    order of preference (the first non-empty one is kept), how time is written (``unix``
    seconds or an ISO ``date``), and whether lines may be Python literals."""

    fields: tuple[str, str, str, str]
    text_fields: tuple[str, ...]
    time: str = "unix"
    literal: bool = False


def amazon_format(year: int) -> ReviewFormat:
    return ReviewFormat(("reviewerID", "asin", "overall", "unixReviewTime"), ("summary", "reviewText"), "unix", year == 2014)


YELP_FORMAT = ReviewFormat(("user_id", "business_id", "stars", "date"), ("text",), "date")


def add_review_lines(b: TableBuilder, lines, path: str, fmt: ReviewFormat) -> None:
    """Add every good record among ``lines`` ((line number, text) of ``path``) to ``b``."""
    user, item, rating, when = fmt.fields
    bad = b.bad
    for lineno, text in lines:
        rec = parse_record(text, path, lineno, bad, fmt.literal)
        if rec is None or not _required(rec, fmt.fields, path, lineno, bad):
            continue
        u, i = b.identifier(rec[user], path, lineno, user), b.identifier(rec[item], path, lineno, item)
        if u is None or i is None:
            continue
        r = b.rating(rec[rating], path, lineno, rating)
        t = (b.timestamp(rec[when], path, lineno, when) if fmt.time == "unix"
             else _yelp_time(rec[when], path, lineno, bad))
        if r is not None and t is not None:
            b.add(u, i, r, t, next(filter(None, (_text(rec.get(f)) for f in fmt.text_fields)), ""))


def parse_review_chunk(source: str, policy: str, path: str, lines: list[tuple[int, bytes]], fmt: ReviewFormat) -> dict:
    """One chunk of raw lines of a review file parsed on its own (a Ray task of ``data.engine:
    ray``): ``{"part": Interactions}`` to :meth:`TableBuilder.extend` the file's table with, or
    ``{"error": message}``, the chunk's first bad record under ``data.bad_records: error``."""
    b = TableBuilder(source, BadRecords(policy), with_text=True)
    try:
        add_review_lines(b, decode_lines(lines, path, b.bad), path, fmt)
    except DataError as exc:
        return {"error": str(exc)}
    return {"part": b.part()}


def _add_reviews(b: TableBuilder, path: str, fmt: ReviewFormat, engine: str) -> None:
    """Every good record of one review file into ``b``: read here, or (``engine`` ray) read here
    and parsed in chunks by Ray tasks (:func:`ckf_dist.data.ray_stages.parse_on_ray`)."""
    if engine == "ray":
        from ckf_dist.data.ray_stages import parse_on_ray

        parse_on_ray(b, path, parse_review_chunk, fmt)
    else:
        add_review_lines(b, iter_lines(path, b.bad), path, fmt)


def _add_titles(b, path: str, bad: BadRecords, literal: bool, id_field: str, title_field: str) -> None:
    """Item titles from one metadata file (records without an id are bad, without a title ignored)."""
    b.files.append(path)
    for lineno, text in iter_lines(path, bad):
        rec = parse_record(text, path, lineno, bad, literal)
        if rec is None or not _required(rec, (id_field,), path, lineno, bad):
            continue
        title = _text(rec.get(title_field))
        if title:
            b.titles[str(rec[id_field])] = title


def read_amazon(path: str, meta_path: str, bad: BadRecords, year: int, engine: str = "local") -> Interactions:
    """Amazon review dump (``year`` 2014 or 2018) plus its metadata file for titles."""
    fmt = amazon_format(year)
    reviews = _find(path, ("reviews_*.json.gz", "*.json.gz", "*.json"), "reviews", exclude="meta_")
    b = TableBuilder(f"amazon{year}", bad, with_text=True)
    b.files.append(reviews)
    _add_reviews(b, reviews, fmt, engine)
    meta = meta_path or _find_meta(path)
    if meta:
        _add_titles(b, meta, bad, fmt.literal, "asin", "title")
    return b.build()


def _find_meta(path: str) -> str:
    """The ``meta_*`` file beside the reviews (same folder), or "" when there is none."""
    fs, p = url_to_fs(path)
    folder = p if fs.isdir(p) else p.rsplit("/", 1)[0]
    hits = sorted(fs.glob(f"{folder}/meta_*"))
    return _full(fs, hits[0]) if len(hits) == 1 else ""


def _yelp_time(value, path: str, lineno: int, bad: BadRecords) -> float | None:
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        bad.bad("bad_date", f"{where(path, lineno, 'date')}: not a date: {value!r}")
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def read_yelp(path: str, meta_path: str, bad: BadRecords, engine: str = "local") -> Interactions:
    """Yelp academic dataset: reviews plus business names as item titles."""
    reviews = _find(path, ("*review.json", "*review.json.gz"), "Yelp review")
    b = TableBuilder("yelp", bad, with_text=True)
    b.files.append(reviews)
    _add_reviews(b, reviews, YELP_FORMAT, engine)
    if not meta_path:
        fs, p = url_to_fs(reviews)
        hits = sorted(fs.glob(f"{p.rsplit('/', 1)[0]}/*business.json*"))
        meta_path = _full(fs, hits[0]) if hits else ""
    if meta_path:
        _add_titles(b, meta_path, bad, False, "business_id", "name")
    return b.build()
