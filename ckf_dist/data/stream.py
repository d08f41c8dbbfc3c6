"""Streaming reader of prepared shards: one global order per epoch, per-rank slices of every
global batch, prefetch, exact resume on any number of workers.

Order of one epoch (a pure function of seed, epoch and the dataset, never of the world size):
1. the split's shards are permuted with ``(seed, epoch)`` (kept in stored order when
   ``shuffle_buffer <= 1``) and their rows concatenated into one global sequence;
2. a shuffle buffer of ``shuffle_buffer`` rows, seeded by ``(seed, epoch)``, reorders that
   sequence; it is simulated on row *indices*, so the whole epoch order is known up front;
3. the order is cut into global batches of ``rank_batch * world_size`` rows (the optimizer
   step's rows; the < one global batch left over is dropped) and rank r takes the r-th slice
   of ``rank_batch`` rows of every global batch.

So for one global batch size the same rows make the same step on 1, 2 or 8 workers, and the
cursor is global: ``(epoch, global_position)``, the rows of the epoch all ranks have consumed.
``load_state_dict`` recomputes the order and yields exactly this rank's rows after that
position, whatever world size saved it (:meth:`ShardStream.load_state_dict`). Shards are
fetched, sha256-verified and decoded ``prefetch`` shards ahead (default 8; 0: inline) by up to
4 background threads, and dropped after their last row of the epoch (memory ~ shuffle_buffer
+ prefetch decoded shards). Every rank reads every shard of the split (each uses its slice of
the rows). A queue deeper than the thread count keeps every thread busy: docs/performance.md
has the measured prefetch depths (bench/data_stream.py).

Rows are :class:`Row` objects: zero-copy ``Mapping`` views keyed by the shard columns; list
columns are numpy int32 arrays (int8 for ``slot_kind``), ``cand_ids`` a list of arrays,
scalars plain Python values. ``row.to_dict(lists=True)`` gives plain Python.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from ckf_dist.contract import LIST_COLUMNS
from ckf_dist.data.errors import DataError
from ckf_dist.data.shards import COLUMNS, load_shard, read_dataset_manifest

CHUNK_ROWS = 256
_LIST = LIST_COLUMNS
_SCALAR = [c for c in COLUMNS if c not in _LIST and c != "cand_ids"]
_SCALAR_SET = frozenset(_SCALAR)
_LIST_SET = frozenset(_LIST)
_ALL_SET = frozenset(COLUMNS)
_KEYS = dict.fromkeys(COLUMNS).keys()


def check_tokenizer(manifest: dict, tokenizer) -> None:
    """Raise :class:`DataError` unless ``tokenizer`` is the one the dataset was tokenized with."""
    from ckf_dist.resources import tokenizer_fingerprint

    want = manifest["tokenizer"]
    got = tokenizer_fingerprint(tokenizer)
    if got != want["fingerprint"]:
        raise DataError(f"tokenizer mismatch: the dataset was tokenized with {want['name']!r} (fingerprint {want['fingerprint']}, "
                        f"vocab {want['vocab_size']}), this tokenizer has fingerprint {got} (vocab {len(tokenizer)}); "
                        f"use the matching backbone or re-run `ckf prepare` with its tokenizer (data.tokenizer)")


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a streaming shuffle buffer of size ``buffer`` fed with 0..n-1.

    The classic loop (fill the buffer; at step t emit slot j_t and put item buffer+t there;
    finally emit the leftovers in a random order), computed without a Python loop: the
    item emitted at step t is the one that entered slot j_t last, i.e. ``buffer + t'`` for
    the previous step t' with j_t' == j_t, or the slot's initial item j_t.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    buffer = min(buffer, n)
    steps = n - buffer
    j = rng.integers(0, buffer, size=steps)
    if steps == 0:
        return rng.permutation(np.arange(buffer))
    narrow = np.int16 if buffer <= np.iinfo(np.int16).max else np.int32     # a stable sort of 16-bit keys is a radix sort
    by_slot = np.argsort(j.astype(narrow, copy=False), kind="stable")       # steps grouped by slot, in time order
    js = j[by_slot]
    same_slot = np.r_[False, js[1:] == js[:-1]]
    prev = np.full(steps, -1, dtype=np.int64)
    prev[by_slot[same_slot]] = by_slot[np.flatnonzero(same_slot) - 1]
    out = np.empty(n, dtype=np.int64)
    out[:steps] = np.where(prev >= 0, buffer + prev, j)
    occupant = np.arange(buffer)
    last_in_slot = np.r_[js[1:] != js[:-1], True]
    occupant[js[last_in_slot]] = buffer + by_slot[last_in_slot]
    out[steps:] = rng.permutation(occupant)
    return out


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as is (a shard has one row group), else concatenated."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


class _Columns:
    """A decoded shard: flat numpy buffers and offsets per list column, Python lists for scalars."""

    __slots__ = ("table", "scalars", "lists", "cand")

    def __init__(self, table: pa.Table):
        self.table = table
        self.scalars: dict[str, list] = {}          # filled per column on first access
        self.lists = {}
        for c in _LIST:
            arr = _one_chunk(table.column(c))
            self.lists[c] = (arr.values.to_numpy(zero_copy_only=False), arr.offsets.to_numpy())
        cand = _one_chunk(table.column("cand_ids"))
        inner = cand.values
        self.cand = (cand.offsets.to_numpy(), inner.offsets.to_numpy(), inner.values.to_numpy(zero_copy_only=False))

    def scalar(self, name: str) -> list:
        col = self.scalars.get(name)
        if col is None:
            col = self.scalars[name] = self.table.column(name).to_pylist()
        return col


class Row(tuple):
    """One sample: a read-only, zero-copy view of one row of a decoded shard; a ``Mapping`` of the columns.

    Values are computed on access: list columns are numpy views, ``cand_ids`` a list of
    them, scalars Python values. ``dict(row)`` or :meth:`to_dict` materializes it.
    (A ``(columns, index)`` tuple underneath: built by C-level ``map`` at ~0.1 us per row.)
    """

    __slots__ = ()

    def __getitem__(self, key: str):
        c, i = tuple.__getitem__(self, 0), tuple.__getitem__(self, 1)
        if key in _SCALAR_SET:
            return c.scalar(key)[i]
        if key in _LIST_SET:
            flat, off = c.lists[key]
            return flat[off[i]:off[i + 1]]
        if key == "cand_ids":
            outer, inner, flat = c.cand
            return [flat[inner[k]:inner[k + 1]] for k in range(outer[i], outer[i + 1])]
        raise KeyError(key)

    def __iter__(self):
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)

    def __contains__(self, key) -> bool:
        return key in _ALL_SET

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def keys(self):
        return _KEYS

    def values(self):
        return [self[k] for k in COLUMNS]

    def items(self):
        return [(k, self[k]) for k in COLUMNS]

    def get(self, key, default=None):
        return self[key] if key in _ALL_SET else default

    def to_dict(self, lists: bool = False) -> dict:
        """A plain dict; ``lists=True`` turns arrays into Python lists (JSON-able)."""
        out = dict(self.items())
        if lists:
            out = {k: ([a.tolist() for a in v] if k == "cand_ids" else v.tolist() if isinstance(v, np.ndarray) else v)
                   for k, v in out.items()}
        return out

    def __repr__(self) -> str:
        return f"Row(sample_id={self['sample_id']}, split={self['split']!r}, task={self['task']!r})"


Mapping.register(Row)


ORDER = "global-batch-v1"      # what a cursor's positions mean; a cursor of another order is refused


class ShardStream:
    """Iterates one split of a prepared dataset for one rank (see the module docstring).

    ``rank_batch``: rows this rank takes from every global batch (a training step's
    ``micro_batch_size * grad_accum``); the global batch is ``rank_batch * world_size``.
    """

    def __init__(self, url: str, split: str, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1024, prefetch: int = 8, storage_options: dict | None = None,
                 *, verify: bool = True, drop_remainder: bool = True, rank_batch: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if rank_batch < 1:
            raise ValueError(f"rank_batch: must be >= 1, got {rank_batch}")
        self.url, self.split, self.rank, self.world_size, self.seed = url, split, rank, world_size, seed
        self.shuffle_buffer, self.prefetch, self.verify = shuffle_buffer, max(0, prefetch), verify
        self.drop_remainder, self.rank_batch = drop_remainder, rank_batch
        self.global_batch = rank_batch * world_size
        self.manifest, self._fs, self._root = read_dataset_manifest(url, storage_options)
        self.shards = [s for s in self.manifest["shards"] if s["split"] == split]
        if not self.shards:
            splits = sorted({s["split"] for s in self.manifest["shards"]})
            raise DataError(f"{url}: no shards for split {split!r} (splits: {splits})")
        self._offsets = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.total_rows = int(self._offsets[-1])
        if self.total_rows < self.global_batch:
            raise DataError(f"{url}: split {split!r} has {self.total_rows} rows, fewer than one global batch "
                            f"({rank_batch} rows per rank x world_size {world_size} = {self.global_batch})")
        self.epoch, self.position = 0, 0
        self._chunk: tuple | None = None
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None     # (epoch, rows, shards) of the last epoch asked

    @property
    def position(self) -> int:
        """Rows of the current epoch already handed to the consumer (by this rank)."""
        if self._chunk is not None:     # inside a chunk: its list iterator knows how many rows were taken
            end, it = self._chunk
            return end - operator.length_hint(it)
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._chunk = None
        self._position = value

    # ------------------------------------------------------------------ order and cursor
    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches in one epoch (the same for every world size at one global batch)."""
        return self.total_rows // self.global_batch

    def rows_per_rank(self, epoch: int | None = None) -> int:
        """Rows this rank yields in one epoch (the same on every rank unless drop_remainder=False)."""
        full = self.batches_per_epoch * self.rank_batch
        if self.drop_remainder:
            return full
        left = self.total_rows - self.batches_per_epoch * self.global_batch - self.rank * self.rank_batch
        return full + min(max(left, 0), self.rank_batch)

    def __len__(self) -> int:
        return self.rows_per_rank(self.epoch)

    def global_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(global row indices, shard of each)`` of the whole epoch, in order: one sequence for all ranks."""
        n_shards = len(self.shards)
        shuffle = self.shuffle_buffer > 1
        perm = np.random.default_rng([self.seed, epoch, 7]).permutation(n_shards) if shuffle else np.arange(n_shards)
        seq = np.concatenate([np.arange(self._offsets[s], self._offsets[s + 1]) for s in perm])
        seq_shard = np.repeat(perm, np.diff(self._offsets)[perm])        # the shard of each row of seq
        order = shuffle_buffer_order(self.total_rows, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, 1000]))
        return seq[order], seq_shard[order]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global row indices (into the split's concatenated shards) this rank yields in ``epoch``."""
        return self._epoch_plan(epoch)[0]

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(global row indices, shard of each)`` this rank yields in ``epoch``, in order."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1], self._plan[2]
        rows, shard = self.global_order(epoch)
        r, g = self.rank_batch, self.global_batch
        pos = (np.arange(self.batches_per_epoch)[:, None] * g + self.rank * r + np.arange(r)[None, :]).ravel()
        if not self.drop_remainder:                         # this rank's slice of the partial last batch
            start = self.batches_per_epoch * g + self.rank * r
            pos = np.r_[pos, np.arange(start, min(start + r, self.total_rows))]
        self._plan = (epoch, rows[pos], shard[pos])
        return self._plan[1], self._plan[2]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first row."""
        self.epoch, self.position = int(epoch), 0

    def _normalize(self) -> None:
        if self.position >= self.rows_per_rank(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """JSON-able cursor: this rank's rows already yielded in ``epoch``, the global position of the
        global batch they end in, and what the cursor is valid for."""
        self._normalize()
        order = self.epoch_order(self.epoch) if self.position else None
        nxt = {}
        if order is not None and self.position < len(order):
            g = int(order[self.position])
            s = int(np.searchsorted(self._offsets, g, side="right") - 1)
            nxt = {"next_shard": self.shards[s]["path"], "next_row": g - int(self._offsets[s])}
        batches, offset = divmod(self.position, self.rank_batch)
        return {"order": ORDER, "epoch": self.epoch, "position": self.position,
                "global_position": batches * self.global_batch, "batch_offset": offset,
                "global_batch": self.global_batch, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "shuffle_buffer": self.shuffle_buffer,
                "total_rows": self.total_rows, **nxt}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a :meth:`state_dict` cursor; the next iteration yields exactly the rows not yet yielded.

        A cursor saved by another rank or world size resumes at its global position (it must lie
        on a global-batch boundary, as checkpoints do): this rank then yields its slice of every
        global batch from there on, the rows the saving run would have trained on next.
        """
        if state.get("order") != ORDER:
            raise DataError(f"{self.url}: the resume cursor was written for another sample order "
                            f"({state.get('order', 'per-rank slices, before global batches')!r}, this version uses "
                            f"{ORDER!r}); resume with the version that saved it, or start a new run_name")
        for key in ("split", "seed", "shuffle_buffer", "total_rows", "global_batch"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"{self.url}: resume cursor has {key}={state[key]!r}, this stream has {getattr(self, key)!r}; "
                                f"resume with the same data and settings")
        self.epoch = int(state["epoch"])
        if state["rank"] == self.rank and state["world_size"] == self.world_size:
            self.position = int(state["position"])
            return
        if state["batch_offset"]:
            raise DataError(f"{self.url}: the resume cursor is {state['batch_offset']} rows into a global batch; "
                            f"only a cursor on a global-batch boundary (a checkpoint's) resumes on another rank "
                            f"or world size")
        self.position = int(state["global_position"]) // self.global_batch * self.rank_batch

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        self._normalize()
        base = self.position = self.position          # freeze a position left inside an abandoned chunk
        order, shard_of = self._epoch_plan(self.epoch)
        order, shard_of = order[base:], shard_of[base:]
        loader = _Loader(self, shard_of)                # starts fetching before the row bookkeeping below
        try:
            local = (order - self._offsets[shard_of]).tolist()
            for start in range(0, len(local), CHUNK_ROWS):
                end = min(len(local), start + CHUNK_ROWS)
                chunk = shard_of[start:end].tolist()
                cols = loader.get(chunk)
                rows = list(map(Row, zip(map(cols.__getitem__, chunk), local[start:end])))
                loader.evict(end)
                it = iter(rows)
                self._chunk = (base + end, it)
                yield from it                    # C-level hand-off; ``position`` reads the iterator's progress
                self.position = base + end
        finally:
            loader.close()
        if self.position >= self.rows_per_rank(self.epoch):
            self.epoch, self.position = self.epoch + 1, 0

    def _load(self, s: int) -> _Columns:
        return _Columns(load_shard(self._fs, self._root, self.shards[s], self.url, self.verify))


class _Loader:
    """Shard cache of one pass: fetches ``prefetch`` shards ahead in background threads (in order of
    first use), and drops each shard after its last row of the pass."""

    def __init__(self, stream: ShardStream, shard_of: np.ndarray):
        self.load, self.prefetch = stream._load, stream.prefetch
        # First and last use of each shard, from the runs of equal shards (far fewer than rows:
        # the shuffle buffer only interleaves neighbouring shards).
        n = len(shard_of)
        change = np.flatnonzero(shard_of[1:] != shard_of[:-1]) + 1
        run_shard = shard_of[np.r_[0, change]] if n else shard_of
        run_end = np.r_[change, n] - 1
        uniq, first_run = np.unique(run_shard, return_index=True)
        self.need = uniq[np.argsort(first_run)].tolist()              # shards in order of first use
        last_run = len(run_shard) - 1 - np.unique(run_shard[::-1], return_index=True)[1]
        self.last = dict(zip(uniq.tolist(), run_end[last_run].tolist()))
        self.ahead = 0
        self.pending: dict[int, Future] = {}
        self.loaded: dict[int, _Columns] = {}
        self.started: set[int] = set()                                # each shard is read once per pass
        self.pool = (ThreadPoolExecutor(max_workers=min(self.prefetch, 4), thread_name_prefix="ckf-prefetch")
                     if self.prefetch else None)
        self._submit()

    def _submit(self) -> None:
        """Keep ``prefetch`` shards in flight, in order of first use."""
        while self.pool is not None and self.ahead < len(self.need) and len(self.pending) < self.prefetch:
            s = self.need[self.ahead]
            self.ahead += 1
            if s not in self.started:
                self.started.add(s)
                self.pending[s] = self.pool.submit(self.load, s)

    def get(self, shards: list[int]) -> dict[int, _Columns]:
        """Decoded columns of every shard in ``shards`` (waiting for or loading the missing ones)."""
        self._submit()
        for s in dict.fromkeys(shards):         # distinct, in order (a chunk spans a few shards)
            if s not in self.loaded:
                self.started.add(s)
                fut = self.pending.pop(s, None)
                self.loaded[s] = fut.result() if fut is not None else self.load(s)
        return self.loaded

    def evict(self, end: int) -> None:
        for s in [s for s in self.loaded if self.last[s] < end]:
            del self.loaded[s]

    def close(self) -> None:
        if self.pool is not None:
            for fut in self.pending.values():
                fut.cancel()
            self.pool.shutdown(wait=False, cancel_futures=True)
