"""Prompt rows from the protocol's sample table, shard by shard, on one machine or on Ray workers.

The order of the rows and the cut into shards are fixed by the dataset alone
(:func:`shard_plan`): training samples in a seeded global shuffle, valid/test by user, cut
every ``shard_rows``. Each shard is a pure function of (protocol, tokenizer, plan entry), so
any number of workers, in any order, write byte-identical shards to the local path's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from ckf_dist.contract import SPLITS, TASK_ID
from ckf_dist.data.errors import DataError
from ckf_dist.data.prompts import PromptBuilder
from ckf_dist.data.protocol import Protocol


def split_order(proto: Protocol, seed: int) -> dict[str, np.ndarray]:
    """Sample indices per split in shard order: training in a seeded global shuffle, eval by user."""
    order = {split: proto.table.indices(split) for split in SPLITS}
    order["train"] = order["train"][np.random.default_rng([seed, 31]).permutation(len(order["train"]))]
    return order


def iter_rows(proto: Protocol, builder: PromptBuilder, indices: np.ndarray, split: str, first_id: int):
    """The shard rows of ``indices`` (one split), built one at a time; sample ids from ``first_id``."""
    for n, k in enumerate(indices.tolist()):
        smp = proto.sample(k)
        row = builder.build(smp)
        row.update(sample_id=first_id + n, split=split, task=smp.task, task_id=TASK_ID[smp.task], user=smp.user,
                   item=smp.item, warm=smp.warm, label=smp.label, candidates=smp.candidates)
        yield row


def build_rows(proto: Protocol, builder: PromptBuilder, seed: int) -> dict[str, list[dict]]:
    """All shard rows per split, in memory (small logs and tests; prepare streams them instead)."""
    rows, next_id = {}, 0
    for split, idx in split_order(proto, seed).items():
        rows[split] = list(iter_rows(proto, builder, idx, split, next_id))
        next_id += len(idx)
    return rows


@dataclass(frozen=True)
class ShardJob:
    """One shard to build: ``<split>/part-<index>.parquet`` from ``samples`` (table indices)."""

    split: str
    index: int
    samples: np.ndarray
    first_id: int


def shard_plan(proto: Protocol, seed: int, shard_rows: int) -> list[ShardJob]:
    """Every shard of the dataset, in manifest order (the local path writes the same cuts)."""
    jobs, next_id = [], 0
    for split, idx in split_order(proto, seed).items():
        for k, start in enumerate(range(0, len(idx), shard_rows)):
            jobs.append(ShardJob(split, k, idx[start:start + shard_rows], next_id + start))
        next_id += len(idx)
    return jobs


def slim(proto: Protocol) -> Protocol:
    """The protocol without what row building does not read (CF pairs, eval candidate lists):
    what is shipped to row-building workers."""
    return dataclasses.replace(proto, train_pairs=np.zeros((0, 2), np.int64), train_ratings=np.zeros(0, np.float32),
                               candidates={}, targets={}, target_users={})


class ShardBuilder:
    """Builds and writes shards on a worker (a Ray actor in ``data.engine: ray``): loads the
    tokenizer once, then ``write(job)`` returns the shard's manifest entry."""

    def __init__(self, proto: Protocol, tokenizer: str, url: str, max_title_chars: int, max_review_tokens: int,
                 max_length: int, sequential_answer: str = "title"):
        from ckf_dist.data.shards import ShardFiles
        from ckf_dist.resources import load_tokenizer

        self.proto = proto
        self.builder = PromptBuilder(load_tokenizer(tokenizer), proto.titles, max_title_chars, max_review_tokens,
                                     max_length, sequential_answer)
        self.files = ShardFiles(url)

    def write(self, job: ShardJob) -> dict:
        if os.environ.get("CKF_FAULT") == f"shard@{job.split}/{job.index}":      # test fault injection
            raise DataError(f"injected fault writing shard {job.split}/{job.index} (CKF_FAULT)")
        rows = list(iter_rows(self.proto, self.builder, job.samples, job.split, job.first_id))
        return self.files.write_shard(job.split, job.index, rows)

    def peak_rss(self) -> int:
        """This worker process's peak resident memory in bytes."""
        from ckf_dist.progress import peak_rss_bytes

        return peak_rss_bytes()
