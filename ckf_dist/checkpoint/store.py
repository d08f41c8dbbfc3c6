"""Committed checkpoints on any fsspec URL (local path, s3://, gs://, memory://).

Layout of one run in storage (``<storage>/<run_name>/``)::

    step_00000050/
        ds/...                         DeepSpeed ZeRO shards (engine.save_checkpoint), for resume
        export/trainable.safetensors   gathered, full-shaped trainable weights (bridge + adapters)
        state/rank_00000.json          data cursor, python/numpy RNG, per rank
        state/rng_rank_00000.safetensors  torch RNG states, per rank
        files/rank_00000.json          sha256 + size of every file that rank wrote
        manifest.json                  step, world size, config, versions, all files + sha256
        COMMITTED                      written last: a checkpoint without it is never picked

Commit protocol: every rank writes and uploads its own files (through ``ray.train.report``),
all ranks meet at a barrier, then rank 0 merges the per-rank file lists into the manifest
and writes the marker. A crash anywhere before the marker leaves an uncommitted directory
that :func:`latest_committed` skips and :func:`apply_retention` eventually deletes.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec

from ckf_dist.contract import CHECKPOINT_MANIFEST, COMMIT_MARKER
from ckf_dist.progress import bar
from ckf_dist.storage import guarded, open_url, url_of

STEP_DIR = re.compile(r"^step_(\d{8})$")
CHECKPOINT_SCHEMA = 1


from ckf_dist.errors import CheckpointError  # noqa: E402  (re-exported)


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def sha256_stream(f, chunk: int = 1 << 22) -> str:
    """sha256 of what is left to read in an open binary file (local or fsspec)."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a local file."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def hash_tree(root: str | Path) -> dict[str, dict]:
    """``{relative/posix/path: {"sha256", "bytes"}}`` for every file below a local folder."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


@dataclass
class CheckpointRef:
    """A committed checkpoint: where it is and what its manifest says."""

    fs: fsspec.AbstractFileSystem
    path: str
    step: int
    manifest: dict

    @property
    def url(self) -> str:
        return url_of(self.fs, self.path)


def _list_step_dirs(fs, run_path: str) -> list[tuple[int, str]]:
    try:
        entries = fs.ls(run_path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        m = STEP_DIR.match(posixpath.basename(e.rstrip("/")))
        if m:
            out.append((int(m.group(1)), e.rstrip("/")))
    return sorted(out)


def read_checkpoint_manifest(fs, ckpt_path: str) -> dict:
    """Manifest of a checkpoint folder; CheckpointError when it is not committed."""
    if not fs.exists(posixpath.join(ckpt_path, COMMIT_MARKER)):
        raise CheckpointError(f"{ckpt_path}: no {COMMIT_MARKER} marker; the checkpoint was never committed")
    try:
        with fs.open(posixpath.join(ckpt_path, CHECKPOINT_MANIFEST), "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_path}: committed but {CHECKPOINT_MANIFEST} is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{ckpt_path}/{CHECKPOINT_MANIFEST}: not valid JSON ({exc})") from None


def latest_committed(storage_url: str, run_name: str) -> CheckpointRef | None:
    """The newest committed checkpoint of a run, or None. Uncommitted folders are skipped."""
    fs, root = open_url(storage_url)
    run_path = posixpath.join(root, run_name)
    with guarded(url_of(fs, run_path)):
        fs.invalidate_cache()
        for step, path in reversed(_list_step_dirs(fs, run_path)):
            if fs.exists(posixpath.join(path, COMMIT_MARKER)):
                return CheckpointRef(fs, path, step, read_checkpoint_manifest(fs, path))
    return None


def resolve_checkpoint(url: str) -> CheckpointRef:
    """A checkpoint URL, or a run folder (its latest committed checkpoint), as a CheckpointRef."""
    fs, path = open_url(url)
    with guarded(url):
        fs.invalidate_cache()
        if not fs.exists(path):
            raise CheckpointError(f"{url}: not found")
        m = STEP_DIR.match(posixpath.basename(path))
        if m:
            return CheckpointRef(fs, path, int(m.group(1)), read_checkpoint_manifest(fs, path))
        steps = _list_step_dirs(fs, path)
        for step, p in reversed(steps):
            if fs.exists(posixpath.join(p, COMMIT_MARKER)):
                return CheckpointRef(fs, p, step, read_checkpoint_manifest(fs, p))
    if steps:
        raise CheckpointError(f"{url}: {len(steps)} checkpoint folder(s) but none committed (no {COMMIT_MARKER} marker)")
    raise CheckpointError(f"{url}: neither a checkpoint (step_XXXXXXXX) nor a run folder holding one")


def commit(fs, ckpt_path: str, manifest: dict, world_size: int) -> None:
    """Merge per-rank file lists into the manifest, write it, then the marker (last).

    Every listed file must be in storage with its listed size. On object stores this costs
    one recursive listing and a concurrent fetch of the rank lists beside it, not a request per file."""
    fs.invalidate_cache()
    listings = [posixpath.join(ckpt_path, "files", f"rank_{rank:05d}.json") for rank in range(world_size)]

    def read(listing: str):   # cat_file reads the path literally (``cat`` would glob "[", "*", "?")
        try:
            return fs.cat_file(listing)
        except FileNotFoundError:
            return None
        except Exception as exc:  # reported per rank below
            return exc

    with ThreadPoolExecutor(min(16, world_size + 1), thread_name_prefix="ckf-commit") as pool:
        found = pool.submit(fs.find, ckpt_path, detail=True)      # the listing, beside the rank lists' fetch
        raws = list(pool.map(read, listings))
        found = found.result()
    files: dict[str, dict] = {}
    for rank, (listing, raw) in enumerate(zip(listings, raws)):
        if raw is None:
            raise CheckpointError(f"{listing}: rank {rank} did not upload its file list; not committing")
        if isinstance(raw, Exception):
            raise CheckpointError(f"{listing}: cannot read rank {rank}'s file list ({type(raw).__name__}: {raw}); "
                                  "not committing")
        try:
            files.update(json.loads(raw))
        except ValueError as exc:
            raise CheckpointError(f"{listing}: rank {rank}'s file list is not valid JSON ({exc}); not committing") from None
    base = fs._strip_protocol(ckpt_path).rstrip("/") + "/"
    sizes = {k[len(base):]: info.get("size") for k, info in found.items() if k.startswith(base)}
    for rel, meta in files.items():
        size = sizes.get(rel)
        if size != meta["bytes"]:
            raise CheckpointError(f"{posixpath.join(ckpt_path, rel)}: expected {meta['bytes']} bytes, found {size}; "
                                  "not committing")
    manifest = dict(manifest, files=files, schema=CHECKPOINT_SCHEMA)
    with fs.open(posixpath.join(ckpt_path, CHECKPOINT_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with fs.open(posixpath.join(ckpt_path, COMMIT_MARKER), "w") as f:
        f.write(f"{manifest.get('step', '')}\n")


def fetch(ref: CheckpointRef, rel_paths: list[str], dest: str | Path, verify: bool = True) -> Path:
    """Download some files of a committed checkpoint to a local folder, checking their sha256."""
    dest = Path(dest)
    files = ref.manifest.get("files", {})
    for rel in rel_paths:
        if rel not in files:
            raise CheckpointError(f"{ref.url}: {rel} is not listed in its manifest")
        src = posixpath.join(ref.path, rel)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with guarded(f"{ref.url}/{rel}"):
                ref.fs.get_file(src, str(out))
        except FileNotFoundError:
            raise CheckpointError(f"{ref.url}/{rel}: missing (listed in the manifest)") from None
        if verify:
            digest = sha256_file(out)
            if digest != files[rel]["sha256"]:
                raise CheckpointError(f"{ref.url}/{rel}: sha256 mismatch (corrupt shard): expected {files[rel]['sha256'][:12]}…, got {digest[:12]}…")
    return dest


def verify(ref: CheckpointRef, deep: bool = False, progress: bool = False) -> int:
    """Check every file of the manifest: present with its size, and with ``deep`` its sha256 too.

    Without ``deep`` only the files a reader fetches are hashed (:func:`fetch`); ``deep`` streams
    every listed file (ZeRO shards, RNG and cursor state, the export) through sha256, so a file
    corrupted at the same size is found before a resume or a consolidation relies on it. All bad
    files are collected and reported together. Returns the number of files checked.
    """
    files = ref.manifest.get("files", {})
    bad: list[str] = []
    with guarded(ref.url):
        ref.fs.invalidate_cache()
        for rel, meta in bar(sorted(files.items()), len(files), "verify sha256", progress and deep):
            full = posixpath.join(ref.path, rel)
            if not ref.fs.exists(full):
                bad.append(f"{rel}: missing (listed in the manifest)")
                continue
            size = ref.fs.size(full)
            if size != meta["bytes"]:
                bad.append(f"{rel}: size {size} != {meta['bytes']} in the manifest")
                continue
            if deep:
                with ref.fs.open(full, "rb") as f:
                    digest = sha256_stream(f)
                if digest != meta["sha256"]:
                    bad.append(f"{rel}: sha256 {digest[:12]}... != {meta['sha256'][:12]}... in the manifest")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(f"{ref.url}: {len(bad)} of {len(files)} files corrupt or missing: "
                              + "; ".join(bad[:5]) + more)
    return len(files)


def apply_retention(storage_url: str, run_name: str, num_to_keep: int) -> list[str]:
    """Delete all but the newest ``num_to_keep`` committed checkpoints and any uncommitted folder
    older than the newest committed one. Returns the deleted paths."""
    fs, root = open_url(storage_url)
    fs.invalidate_cache()
    steps = _list_step_dirs(fs, posixpath.join(root, run_name))
    committed = [(s, p) for s, p in steps if fs.exists(posixpath.join(p, COMMIT_MARKER))]
    if not committed:
        return []
    newest = committed[-1][0]
    keep = {p for _, p in committed[-num_to_keep:]}
    doomed = [p for s, p in steps if p not in keep and s <= newest]
    committed_paths = {p for _, p in committed}
    for p in doomed:
        if p in committed_paths:   # uncommitted first: a delete cut short never leaves a "committed" partial
            fs.rm(posixpath.join(p, COMMIT_MARKER))
        fs.rm(p, recursive=True)
    return doomed
