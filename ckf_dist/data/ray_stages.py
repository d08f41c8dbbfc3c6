"""Prepare stages on Ray (``data.engine: ray``): parsing a log in parallel, the k-core filter
on Ray Data as iterated group-by counts, the per-user split, sample drawing, and prompt rows.

**Parsing** (:func:`parse_on_ray`). A compressed file is one stream that only one reader can
decompress, but decompressing and cutting lines is cheap next to parsing them (JSON, checks, text
clean-up). The driver reads the raw lines and ships chunks of them, with their line numbers, to
Ray tasks that parse them into compact columns (:meth:`TableBuilder.part`); the driver appends
the chunks in file order (:meth:`TableBuilder.extend`), so ids get the codes, and skipped
records the counts and examples, of a reading on one machine. At most ``window`` chunks are in
flight, so the driver holds a bounded number of raw lines. Under ``data.bad_records: error`` the
first bad record in file order is the error, with its file and line, as on one machine.

**Samples** (:func:`samples_on_ray`). Every draw of the split's samples (task, candidates) comes
from a generator seeded by (seed, stream, user), so users can be cut into ranges: Ray tasks draw
the samples of a range each (:func:`ckf_dist.data.samples.user_samples`, ranges of about equal
interactions), and the driver appends them in user order, which is the local table.

**Split** (:func:`split_on_ray`). Leave-last-out needs, per user, its row count and its two
latest rows: each block finds them for its own users (a map-side combine), the driver folds
them into three dense per-user arrays, and a ``map_batches`` pass labels every row (history,
valid, test, or dropped for a user with fewer than 3 rows). The temporal split labels rows by
two global time cuts (quantiles the driver takes over the timestamps).

**Prompt rows and shards** (:func:`rows_on_ray`). The shard plan (:func:`ckf_dist.data.rows.shard_plan`)
is fixed by the dataset alone; a Ray Data pipeline over the plan's job numbers runs
``map_batches`` on a pool of ``data.ray_workers`` actors, each holding the slimmed protocol and the
tokenizer once, that build, tokenize and write one shard per job to the output URL and return its
manifest entry. Entries are put back in plan order, so the manifest is the local one.

**k-core.**
k-core filtering keeps the largest set of interactions in which every user and every item has
at least ``k`` of them. It is unique, so any order of removals that stops at a fixed point
gives the same set; this module reaches it the way a cluster does, and the local
:func:`ckf_dist.data.protocol.kcore` (``np.bincount`` rounds) the way one machine does.

Each round on Ray Data:

1. rows per user and per item over the interactions still kept: each block counts its own
   distinct users and items where it lives (a map-side combine, ``np.unique``), and the driver
   adds the partial counts as they stream in, into two dense arrays, one entry per user and per
   item (memory grows with users + items, never with interactions);
2. the arrays go to the object store once, and a ``map_batches`` filter drops every row whose
   user or item has fewer than ``k``; the result is materialized (the next round starts from
   it, not from the whole lineage);
3. the rounds stop when a filter drops nothing.

Only the row numbers of the kept interactions come back at the end (8 bytes each).

Why not ``Dataset.groupby(...).count()``: its hash shuffle starts aggregator actors for every
group-by, two per round. On 20,000 interactions on 2 cores (3 rounds) it took 61 s against
5.4 s for the combine above, with the same result.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa

from ckf_dist.data.errors import BadRecords, DataError
from ckf_dist.data.sources.base import TableBuilder, iter_raw_lines

CHUNK_LINES = 20_000          # raw lines per parsing task


class _ChunkError(DataError):
    """A bad record a parsing task found (raised in file order)."""


def parse_on_ray(b: TableBuilder, path: str, parse_chunk, fmt, chunk_lines: int | None = None,
                 window: int | None = None) -> None:
    """Append every good record of ``path`` to ``b``, parsed by Ray tasks (``ray.init`` first):
    ``parse_chunk(source, policy, path, [(line, raw bytes)], fmt)`` returns ``{"part": ...}`` or
    ``{"error": message}`` (see :func:`ckf_dist.data.sources.jsonlines.parse_review_chunk`)."""
    import ray

    task = ray.remote(num_cpus=1)(parse_chunk)
    chunk_lines = chunk_lines or CHUNK_LINES
    if window is None:
        window = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    pending: collections.deque = collections.deque()
    reading = BadRecords(b.bad.policy)        # the file's own problems (truncated stream) come after its lines

    def append_next() -> None:
        out = ray.get(pending.popleft())
        if "error" in out:
            raise _ChunkError(out["error"])
        b.extend(out["part"])

    chunk: list = []
    try:
        for n, raw in iter_raw_lines(path, reading):
            chunk.append((n, raw))
            if len(chunk) >= chunk_lines:
                pending.append(task.remote(b.source, b.bad.policy, path, chunk, fmt))
                chunk = []
                while len(pending) >= window:
                    append_next()
        if chunk:
            pending.append(task.remote(b.source, b.bad.policy, path, chunk, fmt))
        while pending:
            append_next()
    except DataError as exc:
        if not isinstance(exc, _ChunkError):  # the file's own error: a bad record before it comes first
            while pending:
                append_next()
        raise
    finally:
        for ref in pending:
            ray.cancel(ref)
    b.bad.merge(reading)


def _row_dataset(columns: dict, blocks: int):
    """A Ray dataset of ``columns`` (equal-length arrays, non-empty) with their row numbers in a
    ``row`` column, cut into at most ``blocks`` blocks in row order."""
    import ray

    n = len(next(iter(columns.values())))
    table = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), **{k: pa.array(v) for k, v in columns.items()}})
    step = -(-n // max(1, min(blocks, n)))
    return ray.data.from_arrow([table.slice(s, step) for s in range(0, n, step)])


def _keep_rows(batch: dict, user_counts, item_counts, k: int) -> dict:
    """The rows of ``batch`` whose user and item both have >= k interactions (the counts arrive as
    object references: a read from the worker's object store, zero-copy)."""
    import ray

    user_counts, item_counts = ray.get([user_counts, item_counts])
    keep = (user_counts[batch["u"]] >= k) & (item_counts[batch["i"]] >= k)
    return {name: col[keep] for name, col in batch.items()}


def _partial_counts(batch: dict) -> dict:
    """Map-side combine: this batch's distinct users and items with their row counts."""
    u, uc = np.unique(batch["u"], return_counts=True)
    i, ic = np.unique(batch["i"], return_counts=True)
    return {"kind": np.r_[np.zeros(len(u), np.int8), np.ones(len(i), np.int8)], "id": np.r_[u, i],
            "n": np.r_[uc, ic].astype(np.int64)}


def _dense_counts(ds, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows per user and per item: each block's counts are combined where the block lives, and
    the driver adds the partial counts as they stream in (into two dense arrays)."""
    out = (np.zeros(n_users, dtype=np.int64), np.zeros(n_items, dtype=np.int64))
    partial = ds.map_batches(_partial_counts, batch_format="numpy", batch_size=None)
    for batch in partial.iter_batches(batch_format="numpy", batch_size=1 << 16):
        for kind in (0, 1):
            sel = batch["kind"] == kind
            np.add.at(out[kind], batch["id"][sel], batch["n"][sel])
    return out


def kcore_on_ray(users: np.ndarray, items: np.ndarray, k: int, blocks: int = 8) -> tuple[np.ndarray, int]:
    """Boolean mask of the interactions kept by k-core filtering, computed on the current Ray
    cluster (``ray.init`` first); the same mask as :func:`ckf_dist.data.protocol.kcore`.
    Returns (mask, rounds)."""
    import ray

    users = np.asarray(users)
    items = np.asarray(items)
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=bool), 0
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    ds = _row_dataset({"u": users.astype(np.int32), "i": items.astype(np.int32)}, blocks).materialize()
    kept, rounds = n, 0
    while True:
        rounds += 1
        uc, ic = (ray.put(c) for c in _dense_counts(ds, n_users, n_items))
        ds = ds.map_batches(_keep_rows, fn_kwargs={"user_counts": uc, "item_counts": ic, "k": k},
                            batch_format="numpy", zero_copy_batch=True).materialize()
        now = ds.count()
        if now == kept or now == 0:
            break
        kept = now
    mask = np.zeros(n, dtype=bool)
    for batch in ds.select_columns(["row"]).iter_batches(batch_format="numpy", batch_size=1 << 20):
        mask[batch["row"]] = True
    return mask, rounds


def _top_two(who: np.ndarray, row: np.ndarray) -> tuple:
    """Per distinct ``who`` (ascending): its number of rows, its largest and its second largest
    ``row`` (-1 where it has one)."""
    if len(who) == 0:
        return who, np.zeros(0, np.int64), row, row
    order = np.lexsort((row, who))
    who, row = who[order], row[order]
    end = np.r_[np.flatnonzero(np.diff(who)) + 1, len(who)] - 1     # last position of each group
    begin = np.r_[0, end[:-1] + 1]
    return who[end], (end - begin + 1).astype(np.int64), row[end], np.where(end > begin, row[np.maximum(end - 1, 0)], -1)


def _last_two(batch: dict) -> dict:
    """Map-side combine of the split: per user in this batch, its row count and its latest and
    second-latest row numbers (-1 where it has one row)."""
    u, n, last, second = _top_two(batch["u"], batch["row"])
    return {"u": u, "n": n, "last": last, "second": second}


def _merge_last_two(top: np.ndarray, u: np.ndarray, last: np.ndarray, second: np.ndarray) -> None:
    """Fold partial (user, latest, second latest) rows into ``top`` [n_users, 2] (a user may
    appear in several partials of one batch; -1 is no row)."""
    seen = np.unique(u)
    who = np.r_[u, u, seen, seen]
    row = np.r_[last, second, top[seen, 0], top[seen, 1]]
    users, _, latest, second_latest = _top_two(who[row >= 0], row[row >= 0])
    top[users, 0] = latest
    top[users, 1] = second_latest


def _split_rows(batch: dict, last, second, count, cuts, min_rows: int) -> dict:
    """Split label of each row: 0 history, 1 valid, 2 test, -1 for a user too short to split."""
    import ray

    last, second, count = ray.get([last, second, count])
    u, row = batch["u"], batch["row"]
    if cuts is None:                                                  # leave-last-out
        label = np.where(row == last[u], 2, np.where(row == second[u], 1, 0))
    else:                                                             # global time cuts
        label = np.where(batch["ts"] < cuts[0], 0, np.where(batch["ts"] < cuts[1], 1, 2))
    label = np.where(count[u] >= min_rows, label, -1).astype(np.int8)
    return {"row": row, "label": label}


def split_on_ray(users: np.ndarray, times: np.ndarray, cuts: tuple[float, float] | None, min_rows: int = 3,
                 blocks: int = 8) -> np.ndarray:
    """The per-user chronological split on Ray Data (``ray.init`` first): the split label of every
    interaction (users sorted, each user's rows in chronological order, as the local protocol
    holds them): 0 history, 1 validation, 2 test, -1 for a user with fewer than ``min_rows``.

    ``cuts`` None is leave-last-out: a map-side combine finds each user's row count and two
    latest rows per block, the driver merges them into three dense per-user arrays (memory grows
    with users, not interactions), and a ``map_batches`` pass labels the rows. Otherwise ``cuts``
    are the two global time cuts of the temporal split, applied row by row."""
    import ray

    users = np.asarray(users)
    n = len(users)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    n_users = int(users.max()) + 1
    ds = _row_dataset({"u": users.astype(np.int32), "ts": np.asarray(times, dtype=np.float64)}, blocks)
    count = np.zeros(n_users, dtype=np.int64)
    top = np.full((n_users, 2), -1, dtype=np.int64)                  # latest, second latest row
    partial = ds.map_batches(_last_two, batch_format="numpy", batch_size=None)
    for b in partial.iter_batches(batch_format="numpy", batch_size=1 << 16):
        np.add.at(count, b["u"], b["n"])
        _merge_last_two(top, b["u"], b["last"], b["second"])
    refs = [ray.put(x) for x in (top[:, 0].copy(), top[:, 1].copy(), count)]
    labelled = ds.map_batches(_split_rows, fn_kwargs={"last": refs[0], "second": refs[1], "count": refs[2],
                                                      "cuts": cuts, "min_rows": min_rows},
                              batch_format="numpy", zero_copy_batch=True)
    out = np.full(n, -1, dtype=np.int8)
    for b in labelled.iter_batches(batch_format="numpy", batch_size=1 << 20):
        out[b["row"]] = b["label"]
    return out


def user_ranges(sizes: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of consecutive users with about equal total ``sizes`` (at most ``parts``)."""
    n = len(sizes)
    if n == 0:
        return []
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="right")
    bounds = np.unique(np.r_[0, cuts, n])
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def samples_on_ray(ctx, seqs: list, seq_split: list, warm: np.ndarray, n_hist: np.ndarray,
                   text_flags: list | None, blocks: int = 8) -> list[dict]:
    """The parts :func:`ckf_dist.data.samples.user_samples` returns for ranges of users, drawn by
    Ray tasks (``ray.init`` first), in user order."""
    import ray

    from ckf_dist.data.samples import user_samples

    task = ray.remote(num_cpus=1)(user_samples)
    ctx_ref = ray.put(ctx)
    ranges = user_ranges(np.array([len(s) for s in seqs], dtype=np.int64), blocks)
    refs = [task.remote(ctx_ref, lo, seqs[lo:hi], seq_split[lo:hi], warm[lo:hi], n_hist[lo:hi],
                        text_flags[lo:hi] if text_flags is not None else None) for lo, hi in ranges]
    return ray.get(refs)


class _ShardWriter:
    """``map_batches`` callable of :func:`rows_on_ray`: builds and writes the shards of the plan's
    job numbers it is given; returns each shard's manifest entry (JSON) and this actor's peak RSS."""

    def __init__(self, proto_box: list, seed: int, shard_rows: int, tokenizer: str, url: str, max_title_chars: int,
                 max_review_tokens: int, max_length: int, sequential_answer: str):
        import ray

        from ckf_dist.data.rows import ShardBuilder, shard_plan

        proto = ray.get(proto_box[0])
        self.jobs = shard_plan(proto, seed, shard_rows)
        self.builder = ShardBuilder(proto, tokenizer, url, max_title_chars, max_review_tokens, max_length,
                                    sequential_answer)

    def __call__(self, batch: dict) -> dict:
        import json

        ids = np.asarray(batch["id"], dtype=np.int64)
        entries = [json.dumps(self.builder.write(self.jobs[int(k)])) for k in ids]
        return {"id": ids, "entry": np.array(entries, dtype=object),
                "rss": np.full(len(ids), self.builder.peak_rss(), dtype=np.int64)}


def rows_on_ray(proto, n_jobs: int, seed: int, d):
    """Build and write the ``n_jobs`` shards of ``shard_plan(proto, seed, d.shard_rows)`` with
    ``map_batches`` on ``d.ray_workers`` actors (1 CPU each). Yields ``(job number, manifest entry,
    the writing actor's peak RSS in bytes)`` as each shard lands, in any order."""
    import json

    import ray

    from ckf_dist.data.rows import slim

    box = [ray.put(slim(proto))]               # boxed: each actor fetches it once, nothing inlines it
    ds = ray.data.range(n_jobs, override_num_blocks=max(1, n_jobs)).map_batches(
        _ShardWriter, batch_size=1, concurrency=d.ray_workers, num_cpus=1,
        fn_constructor_args=(box, seed, d.shard_rows, d.tokenizer, d.output, d.max_title_chars,
                             d.max_review_tokens, d.max_length, d.sequential_answer))
    for row in ds.iter_rows():
        yield int(row["id"]), json.loads(row["entry"]), int(row["rss"])
