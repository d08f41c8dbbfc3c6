"""``ckf prepare``: source -> protocol -> CF stage -> prompts -> shards + manifest.

:func:`run_prepare` is the library entry point of the command; it returns the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import time

import numpy as np
import pyarrow as pa

from ckf_dist.cf import train_cf
from ckf_dist.data.prompts import PromptBuilder
from ckf_dist.data.protocol import SPLITS, Protocol, build_protocol
from ckf_dist.data.rows import iter_rows, shard_plan, split_order
from ckf_dist.data.shards import DatasetWriter, preflight, table_bytes
from ckf_dist.data.sources import load_interactions
from ckf_dist.resources import load_tokenizer, tokenizer_fingerprint
from ckf_dist.progress import StageClock, bar
from ckf_dist.progress import log as status

# data config fields that choose how a dataset is computed, not what it holds (kept out of
# the manifest's data_config, so every engine writes the same manifest)
ENGINE_FIELDS = ("engine", "ray_workers", "ray_address")


def _engine_line(d) -> str:
    return f"ray, {d.ray_workers} workers" if d.engine == "ray" else "local"


@contextlib.contextmanager
def ray_session(cfg, progress: bool):
    """Ray for ``data.engine: ray``: joins ``data.ray_address``, or starts a local cluster with one
    logical CPU per row-building worker plus headroom (Ray waits forever when every CPU is held);
    a session started here is shut down on exit. Nothing for the local engine."""
    d = cfg.data
    if d.engine != "ray":
        yield
        return
    import ray

    started = not ray.is_initialized()
    if started:
        env = {k: os.environ[k] for k in cfg.train.forward_env if k in os.environ}
        if d.ray_address:
            ray.init(address=d.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:
            ray.init(num_cpus=d.ray_workers + 2, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": env})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = progress
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _rows_on_ray(cfg, proto: Protocol, writer: DatasetWriter, lease, progress: bool) -> int:
    """Build and write the shards with Ray Data ``map_batches`` on ``data.ray_workers`` actors
    (inside :func:`ray_session`; :func:`ckf_dist.data.ray_stages.rows_on_ray`); entries are added
    in manifest order. Returns the largest peak RSS of the workers, in bytes."""
    from ckf_dist.data.ray_stages import rows_on_ray

    d = cfg.data
    n_jobs = len(shard_plan(proto, cfg.seed, d.shard_rows))
    got, rss = {}, 0
    for k, entry, worker_rss in bar(rows_on_ray(proto, n_jobs, cfg.seed, d), n_jobs, "  shards", progress):
        got[k] = entry
        rss = max(rss, worker_rss)
        lease.check()
    missing = sorted(set(range(n_jobs)) - set(got))
    if missing:
        raise RuntimeError(f"prepare on Ray: shards {missing[:5]} of {n_jobs} never reported back; nothing was committed")
    writer.add_shards([got[k] for k in range(n_jobs)])
    return rss


def _metrics_lines(metrics: dict) -> list[str]:
    if metrics.get("loss") == "rating":
        reg = f"{metrics['reg']:g}"
        fit = f"rating loss, ALS, reg {reg}, valid RMSE {metrics['valid_rmse_warm'][reg]:.4f}"
    else:
        fit = f"best epoch {metrics['best_epoch']}"
    lines = [f"  CF baseline ({metrics['model']}, d={metrics['dim']}, {fit}; sampled: "
             f"AUC vs {metrics['negatives']} negatives, HR/NDCG over the sequential candidates)"]
    for split in ("valid", "test"):
        for who in ("cf", "popularity"):
            for group, m in metrics[split][who].items():
                vals = "  ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "users")
                lines.append(f"    {split:5s} {who:10s} {group:4s} (n={m['users']:5d})  {vals}")
    return lines


def _tables(proto: Protocol, builder: PromptBuilder) -> tuple[bytes, bytes]:
    items = pa.table({"item_id": pa.array(np.arange(proto.n_items), pa.int32()), "title": builder.titles,
                      "raw_id": proto.item_raw})
    users = pa.table({"user_id": pa.array(np.arange(proto.n_users), pa.int32()), "raw_id": proto.user_raw,
                      "warm": pa.array(proto.warm)})
    return table_bytes(items), table_bytes(users)


def interactions_table(proto: Protocol) -> bytes:
    """Every kept interaction in user-chronological order with its split (``cf/interactions.parquet``).

    ``split``: 0 = known history (the training part: in training for warm users, fold-in only
    for users held out), 1 = valid target, 2 = test target. The evaluation derives its
    same-row baselines (popularity, rating means, the rating regressor) and cold-start groups
    (training counts) from it.
    """
    users = np.concatenate([np.full(len(s), x, dtype=np.int32) for x, s in enumerate(proto.seqs)])
    split = np.concatenate(proto.seq_split).astype(np.int8)
    return table_bytes(pa.table({
        "user": pa.array(users, pa.int32()),
        "item": pa.array(np.concatenate(proto.seqs).astype(np.int32), pa.int32()),
        "rating": pa.array(np.concatenate(proto.seq_ratings).astype(np.float32), pa.float32()),
        "split": pa.array(split, pa.int8()),
    }))


def run_prepare(cfg, overwrite: bool = False, progress: bool = True) -> dict:
    """Turn the configured log into a prepared dataset at ``cfg.data.output``; returns the manifest.

    The folder is leased for the whole run (:class:`ckf_dist.lease.Lease`): a second ``ckf prepare``
    into it is refused before it touches anything, with the holder named."""
    from ckf_dist.lease import Lease

    preflight(cfg.data.output, overwrite)          # reachable, no finished dataset: before taking the lease
    with Lease(cfg.data.output, "ckf prepare") as lease, ray_session(cfg, progress):
        return _prepare(cfg, overwrite, progress, lease)


def _prepare(cfg, overwrite: bool, progress: bool, lease) -> dict:
    from safetensors.numpy import save as save_safetensors

    d = cfg.data
    start = time.perf_counter()
    stages = StageClock()
    preflight(d.output, overwrite)
    status(progress, f"prepare: source {d.source}{' (' + d.path + ')' if d.path else ''} -> {d.output}")
    log = load_interactions(d, cfg.seed, progress=progress)
    stages.lap("read")
    status(progress, f"  read {len(log):,} interactions, {len(log.titles):,} titles, skipped {log.bad.skipped} bad records "
                   f"[{stages.line('read')}]")
    proto = build_protocol(log, d, cfg.seed)
    source_info = {"kind": d.source, "path": d.path, "files": log.files, "interactions": len(log)}
    bad_records = log.bad.report()
    del log                                        # the protocol keeps what it needs, in compact arrays
    stages.lap("protocol")
    st = proto.stats
    status(progress, f"  {d.kcore}-core: {st['after_kcore']:,} interactions, {proto.n_users:,} users ({st['warm_users']:,} warm, "
                   f"{proto.n_users - st['warm_users']:,} cold), {proto.n_items:,} items, {len(proto.table):,} samples "
                   f"[{stages.line('protocol')}]")
    cf = train_cf(proto, cfg.cf, cfg.seed)
    stages.lap("cf")
    status(progress, "\n".join(_metrics_lines(cf.metrics)) + f"\n  [{stages.line('cf')}]")
    tok = load_tokenizer(d.tokenizer)
    builder = PromptBuilder(tok, proto.titles, d.max_title_chars, d.max_review_tokens, d.max_length, d.sequential_answer)
    task_counts = proto.table.counts()
    writer = DatasetWriter(d.output, overwrite=overwrite)
    files = {}
    items_bytes, users_bytes = _tables(proto, builder)
    files["items"] = writer.write_file("items.parquet", items_bytes)
    files["users"] = writer.write_file("users.parquet", users_bytes)
    files["cf_embeddings"] = writer.write_file("cf/embeddings.safetensors", save_safetensors({"user": cf.user, "item": cf.item}))
    files["cf_metrics"] = writer.write_file("cf/metrics.json", json.dumps(cf.metrics, indent=1).encode())
    files["cf_interactions"] = writer.write_file("cf/interactions.parquet", interactions_table(proto))
    worker_rss = None
    if d.engine == "ray":
        worker_rss = _rows_on_ray(cfg, proto, writer, lease, progress)
    else:
        next_id = 0
        for split, idx in split_order(proto, cfg.seed).items():
            rows = bar(iter_rows(proto, builder, idx, split, next_id), len(idx), f"  {split} rows", progress)
            writer.write_split(split, rows, d.shard_rows)      # shard by shard: one shard of rows in memory
            next_id += len(idx)
            lease.check()
    stages.lap("rows", worker_rss_gb=None if worker_rss is None else round(worker_rss / 2**30, 3))
    status(progress, f"  built and wrote {sum(e['rows'] for e in writer.shards):,} prompt rows in {len(writer.shards)} "
                     f"shards ({_engine_line(d)}) [{stages.line('rows')}]")
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source_info, has_text=bool(st["has_text"]), bad_records=bad_records),
        "data_config": {k: v for k, v in dataclasses.asdict(d).items() if k not in ENGINE_FIELDS},
        "seed": cfg.seed,
        "tokenizer": {"name": d.tokenizer, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                      "pad_id": builder.pad_id, "eos_id": builder.eos_id, "slot_id": builder.slot_id},
        "n_users": proto.n_users, "n_items": proto.n_items,
        "users": {"warm": int(proto.warm.sum()), "cold": int((~proto.warm).sum())},
        "counts": task_counts,
        "answer_tokens": builder.answer_tokens(),
        "cf": {"path": "cf/embeddings.safetensors", "model": cfg.cf.model, "loss": cfg.cf.loss, "dim": int(cf.user.shape[1]),
               "metrics": cf.metrics},
        "protocol": st,
        "files": files,
        "stages": stages.summary(),                # time and peak memory per stage (not part of the data)
        "engine": {k: getattr(d, k) for k in ENGINE_FIELDS},    # how it was computed (not part of the data)
    }
    lease.check()                                  # still ours: nobody took the folder over meanwhile
    manifest = writer.commit(manifest)
    if progress:
        print("  samples per split and task:")
        for split in SPLITS:
            print(f"    {split:5s} " + "  ".join(f"{t} {n:,}" for t, n in task_counts[split].items()) +
                  f"  (total {sum(task_counts[split].values()):,})")
        n_shards = len(manifest["shards"])
        print("  stages: " + ", ".join(f"{k} {v['s']:.1f}s" for k, v in manifest["stages"].items())
              + f"; peak memory {max(v['rss_gb'] for v in manifest['stages'].values()):.2f} GB", flush=True)
        print(f"  wrote {n_shards} shards + manifest to {d.output} in {time.perf_counter() - start:.1f}s", flush=True)
    return manifest
