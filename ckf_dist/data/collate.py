"""Batching of stream rows into padded tensors (contract in docs/architecture.md).

Both prompt variants are right-padded with ``pad_id``; labels are the token ids on the
answer (from ``*_prompt_len`` on) and -100 on the prompt and the padding. CF slots are
flattened over the batch: ``slot_row[s]`` is the row of slot ``s``, ``slot_pos[s]`` its
position in ``cf_input_ids[slot_row[s]]``. Beyond the contract: ``items`` (target CF item),
``target`` (the row's float label), ``warm`` and ``sample_ids``, for evaluation and logging.
(Per-row numpy is faster than a fully vectorized variant at batch sizes: docs/performance.md, "collate".)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ckf_dist.contract import IGNORE_INDEX


def _pad(seqs: Sequence, pad: int) -> np.ndarray:
    width = max(1, max(len(s) for s in seqs))
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for k, s in enumerate(seqs):
        out[k, : len(s)] = s
    return out


def _stream(rows, ids_key: str, len_key: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [r[ids_key] for r in rows]
    ids = _pad(seqs, pad_id)
    lengths = np.array([len(s) for s in seqs])
    prompt = np.array([r[len_key] for r in rows])
    cols = np.arange(ids.shape[1])[None, :]
    mask = cols < lengths[:, None]
    labels = np.where(mask & (cols >= prompt[:, None]), ids, IGNORE_INDEX)
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(labels)


def collate(rows: Sequence[Mapping], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack stream rows into the model's batch dict (int64 tensors; ``target`` float32, ``warm`` bool)."""
    if not rows:
        raise ValueError("collate: empty batch")
    batch: dict[str, torch.Tensor] = {
        "task_ids": torch.tensor([r["task_id"] for r in rows], dtype=torch.long),
        "users": torch.tensor([r["user"] for r in rows], dtype=torch.long),
        "items": torch.tensor([r["item"] for r in rows], dtype=torch.long),
        "target": torch.tensor([r["label"] for r in rows], dtype=torch.float32),
        "warm": torch.tensor([bool(r["warm"]) for r in rows], dtype=torch.bool),
        "sample_ids": torch.tensor([r["sample_id"] for r in rows], dtype=torch.long),
        "history": torch.from_numpy(_pad([r["history"] for r in rows], -1)),
    }
    for name, ids_key, len_key in (("text", "text_ids", "text_prompt_len"), ("cf", "cf_ids", "cf_prompt_len")):
        ids, mask, labels = _stream(rows, ids_key, len_key, pad_id)
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"], batch[f"{name}_labels"] = ids, mask, labels
    slot_row, slot_pos, slot_kind, slot_cf = [], [], [], []
    for k, r in enumerate(rows):
        pos = r["slot_pos"]
        slot_row.append(np.full(len(pos), k, dtype=np.int64))
        slot_pos.append(np.asarray(pos, dtype=np.int64))
        slot_kind.append(np.asarray(r["slot_kind"], dtype=np.int64))
        slot_cf.append(np.asarray(r["slot_cf_id"], dtype=np.int64))
    for key, parts in (("slot_row", slot_row), ("slot_pos", slot_pos), ("slot_kind", slot_kind), ("slot_cf_id", slot_cf)):
        batch[key] = torch.from_numpy(np.concatenate(parts))
    return batch
