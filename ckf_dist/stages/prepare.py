"""``ckf prepare``: source -> protocol -> CF stage -> prompts -> shards + manifest.

:func:`run_prepare` is the library entry point of the command; it returns the manifest.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time

import numpy as np
import pyarrow as pa

from ckf_dist.contract import TASK_ID
from ckf_dist.cf import train_cf
from ckf_dist.data.prompts import PromptBuilder
from ckf_dist.data.protocol import SPLITS, Protocol, Sample, build_protocol, counts
from ckf_dist.data.shards import DatasetWriter, preflight, table_bytes
from ckf_dist.data.sources import load_interactions
from ckf_dist.resources import load_tokenizer, tokenizer_fingerprint
from ckf_dist.progress import log as status



def build_rows(proto: Protocol, builder: PromptBuilder, seed: int) -> dict[str, list[dict]]:
    """Shard rows per split; training rows in a seeded global shuffle, eval rows by user."""
    by_split: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for smp in proto.samples:
        by_split[smp.split].append(smp)
    perm = np.random.default_rng([seed, 31]).permutation(len(by_split["train"]))
    by_split["train"] = [by_split["train"][k] for k in perm]
    rows: dict[str, list[dict]] = {}
    next_id = 0
    for split in SPLITS:
        out = []
        for smp in by_split[split]:
            row = builder.build(smp)
            row.update(sample_id=next_id, split=split, task=smp.task, task_id=TASK_ID[smp.task], user=smp.user,
                       item=smp.item, warm=smp.warm, label=smp.label, candidates=smp.candidates)
            next_id += 1
            out.append(row)
        rows[split] = out
    return rows


def _metrics_lines(metrics: dict) -> list[str]:
    lines = [f"  CF baseline ({metrics['model']}, d={metrics['dim']}, best epoch {metrics['best_epoch']}; sampled: "
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
    with Lease(cfg.data.output, "ckf prepare") as lease:
        return _prepare(cfg, overwrite, progress, lease)


def _prepare(cfg, overwrite: bool, progress: bool, lease) -> dict:
    from safetensors.numpy import save as save_safetensors

    d = cfg.data
    start = time.perf_counter()
    preflight(d.output, overwrite)
    status(progress, f"prepare: source {d.source}{' (' + d.path + ')' if d.path else ''} -> {d.output}")
    log = load_interactions(d, cfg.seed)
    status(progress, f"  read {len(log):,} interactions, {len(log.titles):,} titles, skipped {log.bad.skipped} bad records "
                   f"[{time.perf_counter() - start:.1f}s]")
    proto = build_protocol(log, d, cfg.seed)
    st = proto.stats
    status(progress, f"  {d.kcore}-core: {st['after_kcore']:,} interactions, {proto.n_users:,} users ({st['warm_users']:,} warm, "
                   f"{proto.n_users - st['warm_users']:,} cold), {proto.n_items:,} items [{time.perf_counter() - start:.1f}s]")
    cf = train_cf(proto, cfg.cf, cfg.seed)
    status(progress, "\n".join(_metrics_lines(cf.metrics)) + f"\n  [{time.perf_counter() - start:.1f}s]")
    tok = load_tokenizer(d.tokenizer)
    builder = PromptBuilder(tok, proto.titles, d.max_title_chars, d.max_review_tokens, d.max_length)
    rows = build_rows(proto, builder, cfg.seed)
    task_counts = counts(proto.samples)
    writer = DatasetWriter(d.output, overwrite=overwrite)
    files = {}
    items_bytes, users_bytes = _tables(proto, builder)
    files["items"] = writer.write_file("items.parquet", items_bytes)
    files["users"] = writer.write_file("users.parquet", users_bytes)
    files["cf_embeddings"] = writer.write_file("cf/embeddings.safetensors", save_safetensors({"user": cf.user, "item": cf.item}))
    files["cf_metrics"] = writer.write_file("cf/metrics.json", json.dumps(cf.metrics, indent=1).encode())
    files["cf_interactions"] = writer.write_file("cf/interactions.parquet", interactions_table(proto))
    for split in SPLITS:
        writer.write_split(split, rows[split], d.shard_rows)
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"kind": d.source, "path": d.path, "files": log.files, "interactions": len(log),
                   "has_text": bool(st["has_text"]), "bad_records": log.bad.report()},
        "data_config": dataclasses.asdict(d),
        "seed": cfg.seed,
        "tokenizer": {"name": d.tokenizer, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok),
                      "pad_id": builder.pad_id, "eos_id": builder.eos_id, "slot_id": builder.slot_id},
        "n_users": proto.n_users, "n_items": proto.n_items,
        "users": {"warm": int(proto.warm.sum()), "cold": int((~proto.warm).sum())},
        "counts": task_counts,
        "answer_tokens": builder.answer_tokens(),
        "cf": {"path": "cf/embeddings.safetensors", "model": cfg.cf.model, "dim": cfg.cf.dim, "metrics": cf.metrics},
        "protocol": st,
        "files": files,
    }
    lease.check()                                  # still ours: nobody took the folder over meanwhile
    manifest = writer.commit(manifest)
    if progress:
        print("  samples per split and task:")
        for split in SPLITS:
            print(f"    {split:5s} " + "  ".join(f"{t} {n:,}" for t, n in task_counts[split].items()) +
                  f"  (total {sum(task_counts[split].values()):,})")
        n_shards = len(manifest["shards"])
        print(f"  wrote {n_shards} shards + manifest to {d.output} in {time.perf_counter() - start:.1f}s", flush=True)
    return manifest
