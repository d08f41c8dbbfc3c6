"""Parquet shards and the manifest of a prepared dataset on any fsspec URL.

Layout (docs/architecture.md): ``<url>/{train,valid,test}/part-NNNNN.parquet``,
``items.parquet``, ``users.parquet``, ``cf/…``, and ``manifest.json`` written LAST.

Commit protocol: the writer first drops a ``_PREPARING.json`` marker, writes every shard
(recording rows, bytes and sha256 of the exact bytes stored), then writes the manifest
atomically (temp + move) and removes the marker. A dataset is complete iff its manifest
exists; readers refuse anything else. A complete dataset is never overwritten unless
asked, and on overwrite its manifest is deleted first so it never looks complete while
it is being replaced.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import socket
import time
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.contract import DATASET_MANIFEST, DATASET_MARKER, SHARD_COLUMNS
from ckf_dist.data.errors import DataError
from ckf_dist.storage import exists, invalidate, join, open_url, read_bytes, unreachable, write_bytes_atomic

SCHEMA_VERSION = 1

_I32 = pa.list_(pa.int32())
SCHEMA = pa.schema([
    ("sample_id", pa.int64()), ("split", pa.string()), ("task", pa.string()), ("task_id", pa.int8()),
    ("user", pa.int32()), ("item", pa.int32()), ("history", _I32), ("warm", pa.bool_()),
    ("text_ids", _I32), ("text_prompt_len", pa.int32()), ("cf_ids", _I32), ("cf_prompt_len", pa.int32()),
    ("slot_pos", _I32), ("slot_kind", pa.list_(pa.int8())), ("slot_cf_id", _I32), ("label", pa.float32()),
    ("candidates", _I32), ("cand_ids", pa.list_(_I32)), ("answer_text", pa.string()),
])
COLUMNS = SCHEMA.names
assert tuple(COLUMNS) == SHARD_COLUMNS, "the shard schema and ckf_dist.contract.SHARD_COLUMNS disagree"


def table_bytes(table: pa.Table) -> bytes:
    """One Parquet file (a single row group, zstd level 1: the smallest of the fast codecs) as bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=1, row_group_size=max(1, table.num_rows))
    return buf.getvalue()


def check_bucket(fs, root: str, url: str) -> None:
    """On object stores, a clear error when the bucket itself is missing or not accessible."""
    if "file" in fs.protocol or "memory" in fs.protocol:
        return
    bucket = root.split("/", 1)[0]
    if exists(fs, bucket, url):
        return
    try:                       # exists() hides why (s3fs answers False when the endpoint is down): ask again
        fs.ls(bucket)
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001
        raise unreachable(url, exc) from None
    raise DataError(f"{url}: bucket {bucket!r} does not exist or is not accessible with these credentials/endpoint")


def preflight(url: str, overwrite: bool = False, storage_options: dict | None = None) -> None:
    """Fail fast, changing nothing: the store must answer and hold no complete dataset (unless overwrite)."""
    fs, root = open_url(url, storage_options)
    invalidate(fs)
    check_bucket(fs, root, url)
    if exists(fs, join(root, DATASET_MANIFEST), url) and not overwrite:
        raise DataError(f"{url}: a complete prepared dataset is already there (manifest.json); "
                        f"pass --overwrite to replace it or choose another data.output")


def write_shard(write_file, split: str, index: int, rows: list[dict]) -> dict:
    """Write one shard of ``rows`` through ``write_file(relpath, data)``; returns its manifest entry."""
    table = pa.table({c: pa.array([r[c] for r in rows], type=SCHEMA.field(c).type) for c in COLUMNS}, schema=SCHEMA)
    entry = write_file(f"{split}/part-{index:05d}.parquet", table_bytes(table))
    entry.update(split=split, rows=len(rows))
    return entry


class ShardFiles:
    """Writes files into a dataset folder. A row-building worker holds one of these (the driver's
    :class:`DatasetWriter` made the folder and commits the manifest)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.fs, self.root = open_url(url, storage_options)
        self._dirs: set[str] = set()

    def write_file(self, relpath: str, data: bytes) -> dict:
        """Store one file under the dataset; returns its ``{path, bytes, sha256}``."""
        path = join(self.root, relpath)
        try:
            parent = path.rsplit("/", 1)[0]
            if parent not in self._dirs:
                self.fs.makedirs(parent, exist_ok=True)    # local filesystems need the folder; object stores ignore it
                self._dirs.add(parent)
            self.fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001
            raise unreachable(f"{self.url}/{relpath}", exc) from None
        return {"path": relpath, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def write_shard(self, split: str, index: int, rows: list[dict]) -> dict:
        return write_shard(self.write_file, split, index, rows)


class DatasetWriter(ShardFiles):
    """Writes one prepared dataset under ``url``; nothing looks complete before :meth:`commit`."""

    def __init__(self, url: str, overwrite: bool = False, storage_options: dict | None = None):
        super().__init__(url, storage_options)
        self.shards: list[dict] = []
        self._prepare_prefix(overwrite)

    def _prepare_prefix(self, overwrite: bool) -> None:
        fs, root, url = self.fs, self.root, self.url
        invalidate(fs)
        check_bucket(fs, root, url)
        if exists(fs, join(root, DATASET_MANIFEST), url):
            if not overwrite:
                raise DataError(f"{url}: a complete prepared dataset is already there (manifest.json); "
                                f"pass --overwrite to replace it or choose another data.output")
            fs.rm(join(root, DATASET_MANIFEST))          # stop looking complete before anything else is touched
        try:
            present = exists(fs, root, url) and bool(fs.ls(root, detail=False))
        except FileNotFoundError:
            present = False
        except Exception as exc:  # noqa: BLE001
            raise unreachable(url, exc) from None
        if present:
            if not overwrite and not exists(fs, join(root, DATASET_MARKER), url):
                raise DataError(f"{url}: not empty and not a ckf dataset; refusing to write there "
                                f"(choose an empty data.output, or pass --overwrite to delete its contents)")
            fs.rm(root, recursive=True)          # a previous partial run (marker present) or an explicit overwrite
            invalidate(fs)
        try:
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(join(root, DATASET_MARKER), json.dumps({"started": time.time(), "host": socket.gethostname()}).encode())
        except Exception as exc:  # noqa: BLE001
            raise unreachable(url, exc) from None

    def write_split(self, split: str, rows: Iterable[dict], shard_rows: int) -> list[dict]:
        """Write ``rows`` (dicts with :data:`COLUMNS`; any iterable, consumed shard by shard, so only
        one shard of rows is held) as ``<split>/part-NNNNN.parquet`` shards."""
        out = []
        it = iter(rows)
        while True:
            chunk = list(itertools.islice(it, shard_rows))
            if not chunk:
                break
            out.append(write_shard(self.write_file, split, len(out), chunk))
        self.shards += out
        return out

    def add_shards(self, entries: list[dict]) -> None:
        """Record shards written elsewhere (by row-building workers), in manifest order."""
        self.shards += entries

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (atomically, last) and remove the in-progress marker."""
        manifest = dict(manifest, schema_version=SCHEMA_VERSION, shards=self.shards)
        try:
            write_bytes_atomic(self.fs, join(self.root, DATASET_MANIFEST), json.dumps(manifest, indent=1).encode())
            self.fs.rm(join(self.root, DATASET_MARKER))
        except Exception as exc:  # noqa: BLE001
            raise unreachable(self.url, exc) from None
        return manifest


def read_dataset_manifest(url: str, storage_options: dict | None = None) -> tuple[dict, object, str]:
    """(manifest, fs, root) of a complete dataset; a clear error for partial or foreign data."""
    fs, root = open_url(url, storage_options)
    invalidate(fs)
    path = join(root, DATASET_MANIFEST)
    if not exists(fs, path, url):
        check_bucket(fs, root, url)
        partial = exists(fs, join(root, DATASET_MARKER), url)
        raise DataError(f"{url}: no manifest.json: " + ("an unfinished `ckf prepare` left it partial; run it again"
                        if partial else "not a prepared dataset (run `ckf prepare` first)"))
    try:
        manifest = json.loads(read_bytes(fs, path, f"{url}/{DATASET_MANIFEST}"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{url}/{DATASET_MANIFEST}: corrupt manifest ({exc})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{url}/{DATASET_MANIFEST}: schema_version {manifest.get('schema_version')!r}, this ckf-dist reads "
                        f"{SCHEMA_VERSION}; re-run `ckf prepare`")
    return manifest, fs, root


def dataset_fingerprint(manifest: dict) -> dict:
    """What identifies a prepared dataset's content: the sha256 of its shard list and of its CF tables.

    ``shards_sha256`` hashes every shard's (split, path, rows, sha256): the same split, prompts
    and labels give the same value, a re-prepared dataset with any other content does not.
    """
    listing = sorted((s["split"], s["path"], s["rows"], s["sha256"]) for s in manifest.get("shards", []))
    return {"shards_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "cf_sha256": manifest.get("files", {}).get("cf_embeddings", {}).get("sha256")}


def check_fingerprint(recorded: dict | None, manifest: dict, url: str, what: str) -> None:
    """Refuse a dataset whose content differs from the one ``what`` (a run) was trained on."""
    if not recorded:
        return
    now = dataset_fingerprint(manifest)
    bad = [k for k in ("shards_sha256", "cf_sha256") if recorded.get(k) and recorded[k] != now[k]]
    if bad:
        detail = "; ".join(f"{k}: trained on {recorded[k][:16]}…, {url} has {now[k][:16] if now[k] else None}…" for k in bad)
        raise DataError(f"{url}: not the dataset {what} was trained on ({detail}); evaluate against the dataset "
                        "the run used (its data.output), or retrain on this one")


def load_shard(fs, root: str, entry: dict, url: str, verify: bool = True) -> pa.Table:
    """One shard as an Arrow table, its size and sha256 checked against the manifest."""
    where = f"{url.rstrip('/')}/{entry['path']}"
    data = read_bytes(fs, join(root, entry["path"]), where)
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != entry["bytes"] or digest != entry["sha256"]:
            raise DataError(f"{where}: corrupt shard: {len(data)} bytes with sha256 {digest[:16]}…, the manifest "
                            f"records {entry['bytes']} bytes with sha256 {entry['sha256'][:16]}…; re-run `ckf prepare`")
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)   # the prefetch threads parallelize
    except pa.ArrowException as exc:
        raise DataError(f"{where}: unreadable Parquet ({exc})") from None
    if table.num_rows != entry["rows"]:
        raise DataError(f"{where}: {table.num_rows} rows, the manifest records {entry['rows']}")
    return table


def read_dataset_file(url: str, name: str, storage_options: dict | None = None, manifest: dict | None = None) -> bytes:
    """A side file of a complete dataset (``items``, ``users``, ``cf_embeddings``, ``cf_metrics``,
    ``cf_interactions``), sha256-checked."""
    if manifest is None:
        manifest, fs, root = read_dataset_manifest(url, storage_options)
    else:
        fs, root = open_url(url, storage_options)
    entry = manifest["files"].get(name)
    if entry is None:
        raise DataError(f"{url}/{DATASET_MANIFEST}: no file {name!r} (files: {sorted(manifest['files'])})")
    where = f"{url.rstrip('/')}/{entry['path']}"
    data = read_bytes(fs, join(root, entry["path"]), where)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise DataError(f"{where}: corrupt file: sha256 differs from the manifest; re-run `ckf prepare`")
    return data


def load_cf_tables(url: str, storage_options: dict | None = None, manifest: dict | None = None) -> dict:
    """The frozen CF tables ``{"user": [n_users, d], "item": [n_items, d]}`` (float32 numpy) of a dataset."""
    from safetensors.numpy import load

    return load(read_dataset_file(url, "cf_embeddings", storage_options, manifest))


def load_interactions_table(url: str, storage_options: dict | None = None, manifest: dict | None = None) -> pa.Table:
    """The split log (``user``, ``item``, ``rating``, ``split``: 0 history, 1 valid, 2 test) of a dataset."""
    if manifest is not None and "cf_interactions" not in manifest.get("files", {}):
        raise DataError(f"{url}: this dataset has no cf/interactions.parquet (prepared by an older ckf-dist); "
                        "re-run `ckf prepare --overwrite` to evaluate against it")
    return pq.read_table(pa.BufferReader(read_dataset_file(url, "cf_interactions", storage_options, manifest)))


def load_items(url: str, storage_options: dict | None = None, manifest: dict | None = None) -> pa.Table:
    """The item table (``item_id``, ``title``, ``raw_id``) of a dataset."""
    return pq.read_table(pa.BufferReader(read_dataset_file(url, "items", storage_options, manifest)))
