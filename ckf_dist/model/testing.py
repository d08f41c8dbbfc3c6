"""Helpers for tests: synthetic batches in the collate contract's format, random adapters.

Batches are built directly in the dict format of ``ckf_dist.data.collate.collate``
(docs/architecture.md), so model tests do not depend on the data package.
"""

from __future__ import annotations

import torch

from ckf_dist.model.bridge import ITEM_SLOT, USER_SLOT


def synthetic_batch(task_ids: list[int], n_users: int, n_items: int, vocab: int = 1000, prompt_len: int = 12,
                    answer_len: int = 3, history_len: int = 4, seed: int = 0, pad_id: int = 2,
                    ragged: bool = True) -> dict[str, torch.Tensor]:
    """A mixed-task batch: text stream without slots, CF stream with one user slot and 1-2 item slots.

    With ``ragged`` the rows have different lengths (right padding, labels -100 on padding).
    """
    g = torch.Generator().manual_seed(seed)
    b = len(task_ids)
    rows_text, rows_cf, slots, histories = [], [], [], []
    for i in range(b):
        extra = int(torch.randint(0, 4, (1,), generator=g)) if ragged else 0
        plen = prompt_len + extra
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        answer = torch.randint(3, vocab, (answer_len,), generator=g)
        n_hist = int(torch.randint(0, history_len + 1, (1,), generator=g))
        hist = torch.randint(0, n_items, (n_hist,), generator=g).tolist()
        histories.append(hist + [-1] * (history_len - n_hist))
        user = int(torch.randint(0, n_users, (1,), generator=g))
        n_item_slots = 1 + i % 2
        positions = [1] + [3 + 2 * k for k in range(n_item_slots)]
        kinds = [USER_SLOT] + [ITEM_SLOT] * n_item_slots
        ids = [user] + torch.randint(0, n_items, (n_item_slots,), generator=g).tolist()
        slots += [(i, p, k, c) for p, k, c in zip(positions, kinds, ids)]
        cf_prompt = prompt.clone()
        cf_prompt[positions] = 0          # the token id in a slot is irrelevant: its embedding is overwritten
        rows_text.append((torch.cat([prompt[len(positions):], answer]), plen - len(positions)))
        rows_cf.append((torch.cat([cf_prompt, answer]), plen))
    batch = {"task_ids": torch.tensor(task_ids, dtype=torch.long),
             "users": torch.tensor([s[3] for s in slots if s[2] == USER_SLOT], dtype=torch.long),
             "history": torch.tensor(histories, dtype=torch.long)}
    for stream, rows in (("text", rows_text), ("cf", rows_cf)):
        width = max(len(r) for r, _ in rows)
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        for i, (r, plen) in enumerate(rows):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
            labels[i, plen:len(r)] = r[plen:]
        batch.update({f"{stream}_input_ids": ids, f"{stream}_attention_mask": mask, f"{stream}_labels": labels})
    for j, key in enumerate(("slot_row", "slot_pos", "slot_kind", "slot_cf_id")):
        batch[key] = torch.tensor([s[j] for s in slots], dtype=torch.long)
    return batch


def randomize_adapters(model, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA B (and A) random values so adapters change the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def randomize_bridge(model, seed: int = 0, std: float = 0.2) -> None:
    """Move every bridge parameter away from its initial value (a "trained" bridge for tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bridge.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of ``rows`` (slots re-indexed), as a per-task reference loop needs it."""
    rows = rows.tolist()
    out = {k: v[rows] for k, v in batch.items() if not k.startswith("slot_")}
    keep = torch.tensor([int(r) in rows for r in batch["slot_row"]], dtype=torch.bool)
    remap = {r: i for i, r in enumerate(rows)}
    out["slot_row"] = torch.tensor([remap[int(r)] for r in batch["slot_row"][keep]], dtype=torch.long)
    for k in ("slot_pos", "slot_kind", "slot_cf_id"):
        out[k] = batch[k][keep]
    return out
