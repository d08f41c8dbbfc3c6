"""Deterministic task heads without new parameters (docs/method.md, "The four tasks").

Every function takes a collated batch (the contract's dict keys, docs/architecture.md) and a
``stream``: ``"cf"`` scores the CF-slot prompts through the bridge, ``"text"`` the text-only
prompts. A row's prompt ends where its labels start (the first position with a label).

- ctr: P(Yes) = softmax([l_No, l_Yes])[1] at the first answer token;
- rating: expected value sum_k k * softmax(l_1..l_5)[k] and the greedy digit (argmax of the five);
- sequential: log-likelihood of every candidate's tokens after the prompt; the shared-prefix path
  runs the prompt once and scores all K candidates in one batch from its cached keys/values;
- review: greedy generation.
"""

from __future__ import annotations

import contextlib

import torch

from ckf_dist.contract import IGNORE_INDEX, SLOT_KEYS
from ckf_dist.model.ckf import CKFModel, output_cache


@contextlib.contextmanager
def _evaluating(model: CKFModel):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def prompt_lengths(batch: dict, stream: str) -> torch.Tensor:
    """Per row, the index where the answer starts (rows without labels: their whole length)."""
    labels, mask = batch[f"{stream}_labels"], batch[f"{stream}_attention_mask"]
    has = labels != IGNORE_INDEX
    first = torch.where(has.any(1), has.int().argmax(1), mask.sum(1))
    return first


def _slots(batch: dict, stream: str) -> dict | None:
    return {k: batch[k] for k in SLOT_KEYS} if stream == "cf" else None


def _row_slots(batch: dict, stream: str, row: int) -> dict | None:
    """The slots of one row, re-indexed as a batch of one."""
    if stream != "cf":
        return None
    sel = batch["slot_row"] == row
    out = {k: batch[k][sel] for k in ("slot_pos", "slot_kind", "slot_cf_id")}
    out["slot_row"] = torch.zeros_like(out["slot_pos"])
    out["history"] = batch["history"][row:row + 1]
    return out


def answer_logits(model: CKFModel, batch: dict, stream: str = "cf") -> torch.Tensor:
    """Logits ``[B, V]`` predicting each row's first answer token."""
    with _evaluating(model):
        ids, mask = batch[f"{stream}_input_ids"], batch[f"{stream}_attention_mask"]
        hidden = model.hidden(ids, mask, batch["task_ids"], _slots(batch, stream)).last_hidden_state
        last = (prompt_lengths(batch, stream) - 1).clamp(min=0)
        return model.logits(hidden[torch.arange(ids.shape[0]), last]).float()


def ctr_scores(model: CKFModel, batch: dict, answer_ids, stream: str = "cf") -> torch.Tensor:
    """P(Yes) ``[B]`` from the two answer logits; ``answer_ids = [no_id, yes_id]`` (manifest answer_tokens)."""
    no_id, yes_id = answer_ids
    logits = answer_logits(model, batch, stream)[:, [no_id, yes_id]]
    return torch.softmax(logits, dim=-1)[:, 1]


def rating_scores(model: CKFModel, batch: dict, digit_ids, stream: str = "cf"):
    """``(expected [B], greedy [B])`` ratings from the logits of the digits "1".."5"."""
    if len(digit_ids) != 5:
        raise ValueError(f"digit_ids: expected the 5 token ids of '1'..'5', got {list(digit_ids)}")
    probs = torch.softmax(answer_logits(model, batch, stream)[:, list(digit_ids)], dim=-1)
    values = torch.arange(1, 6, dtype=probs.dtype, device=probs.device)
    return probs @ values, probs.argmax(-1).to(probs.dtype) + 1


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _row_logliks(model: CKFModel, prompt_ids: torch.Tensor, cand_ids: list[list[int]], task_id: int,
                 slots: dict | None, shared_prefix: bool) -> torch.Tensor:
    """One row's ``[K]`` candidate log-likelihoods: the prompt once with its keys/values copied per
    candidate (``shared_prefix``), or one full forward per candidate (the naive reference)."""
    if any(len(c) == 0 for c in cand_ids):
        raise ValueError("cand_ids: every candidate needs at least one token")
    device = prompt_ids.device
    with _evaluating(model):
        if not shared_prefix:
            return torch.stack([_full_loglik(model, prompt_ids, c, task_id, slots) for c in cand_ids])
        k, p = len(cand_ids), prompt_ids.numel()
        out = model.hidden(prompt_ids.view(1, -1), torch.ones(1, p, dtype=torch.long, device=device),
                           torch.tensor([task_id], device=device), slots, use_cache=True)
        first = torch.log_softmax(model.logits(out.last_hidden_state[0, -1]).float(), -1)        # [V]
        cache = output_cache(out)
        cache.batch_repeat_interleave(k)                    # the prompt's keys/values, once per candidate
        ids, mask = (t.to(device) for t in _pad(cand_ids, 0))
        full_mask = torch.cat([torch.ones(k, p, dtype=torch.long, device=device), mask], dim=1)
        positions = (p + torch.arange(ids.shape[1], device=device)).expand(k, -1)
        cont = model.hidden(ids, full_mask, torch.full((k,), task_id, device=device), None,
                            cache=cache, position_ids=positions, use_cache=True).last_hidden_state
        logp = torch.log_softmax(model.logits(cont[:, :-1]).float(), -1)                      # [K, Lc-1, V]
        nxt = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
        return first[ids[:, 0]] + nxt.sum(1)


def _full_loglik(model: CKFModel, prompt_ids, cand: list[int], task_id: int, slots) -> torch.Tensor:
    seq = torch.cat([prompt_ids, torch.as_tensor(cand, dtype=torch.long, device=prompt_ids.device)]).view(1, -1)
    logits = model(seq, torch.ones_like(seq), torch.tensor([task_id], device=seq.device), slots)
    logp = torch.log_softmax(logits[0, prompt_ids.numel() - 1:-1].float(), -1)
    return logp.gather(-1, seq[0, prompt_ids.numel():].unsqueeze(-1)).sum()


def greedy_generate(model: CKFModel, batch: dict, max_new_tokens: int, eos_id: int, stream: str = "cf",
                    pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of every row's prompt (left-padded internally), without the eos token."""
    lengths = prompt_lengths(batch, stream).tolist()
    src = batch[f"{stream}_input_ids"]
    b, width = src.shape[0], max(lengths)
    device = src.device
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = src[i, :n]
        mask[i, width - n:] = 1
    slots = _slots(batch, stream)
    if slots is not None:      # prompts moved right by their left padding
        shift = torch.as_tensor([width - n for n in lengths], device=device)
        slots = dict(slots, slot_pos=slots["slot_pos"] + shift[slots["slot_row"]])
    task_ids = batch["task_ids"]
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    with _evaluating(model):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model.hidden(ids, mask, task_ids, slots, position_ids=positions, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = model.logits(out.last_hidden_state[:, -1]).argmax(-1)
            for i in range(b):
                if not done[i] and int(nxt[i]) != eos_id:
                    out_tokens[i].append(int(nxt[i]))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = model.hidden(nxt.view(b, 1), mask, task_ids, None, cache=output_cache(out),
                               position_ids=positions, use_cache=True)
    return out_tokens


SCORING_METHODS = ("packed", "shared", "full")


def sequential_logliks(model, batch: dict, cand_ids: list[list[list[int]]], stream: str = "cf",
                       method: str = "packed") -> list[torch.Tensor]:
    """Per row, log p(candidate tokens | prompt) ``[K_i]`` (rank by it; argmax = HR@1).

    ``packed`` (what ``ckf evaluate`` runs): one forward for all of a batch's candidates. Each row
    is packed as ``prompt, cand_1, ..., cand_K`` with a 4-D attention mask in which a candidate's
    tokens see the prompt and the earlier tokens of their own candidate only, and positions
    restart at the prompt's length for every candidate: the prompt runs once and no key/value
    cache is copied per candidate. The two reference methods score row by row: ``shared`` runs
    each prompt once and copies its keys/values per candidate, ``full`` runs one forward per
    candidate (the naive path). All three agree within fp32 tolerance.
    """
    if method not in SCORING_METHODS:
        raise ValueError(f"method: expected one of {SCORING_METHODS}, got {method!r}")
    if method != "packed":
        lengths = prompt_lengths(batch, stream)
        ids = batch[f"{stream}_input_ids"]
        return [_row_logliks(model, ids[i, :int(lengths[i])], cand_ids[i], int(batch["task_ids"][i]),
                             _row_slots(batch, stream, i), method == "shared") for i in range(ids.shape[0])]
    lengths = prompt_lengths(batch, stream).tolist()
    b = len(cand_ids)
    if any(len(c) == 0 for row in cand_ids for c in row):
        raise ValueError("cand_ids: every candidate needs at least one token")
    src = batch[f"{stream}_input_ids"]
    device = src.device
    totals = [n + sum(len(c) for c in row) for n, row in zip(lengths, cand_ids)]
    width = max(totals)
    ids = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)
    src_rows, src_cols, targets, owner = [], [], [], []        # per candidate token: where its logits come from
    k = 0
    for i, (n, row) in enumerate(zip(lengths, cand_ids)):
        ids[i, :n] = src[i, :n].cpu()
        pos[i, :n] = torch.arange(n)
        allowed[i, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        at = n
        for cand in row:
            m = len(cand)
            ids[i, at:at + m] = torch.as_tensor(cand, dtype=torch.long)
            pos[i, at:at + m] = torch.arange(n, n + m)
            allowed[i, at:at + m, :n] = True
            allowed[i, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()
            src_rows += [i] * m
            src_cols += [n - 1] + list(range(at, at + m - 1))
            targets += cand
            owner += [k] * m
            at += m
            k += 1
        allowed[i, at:, at:] = torch.eye(width - at, dtype=torch.bool)      # padding sees itself only
    dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    mask = torch.zeros((b, 1, width, width), dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    with _evaluating(model):
        out = model.hidden(ids.to(device), mask.to(device), batch["task_ids"], _slots(batch, stream),
                           position_ids=pos.to(device))
        hid = out.last_hidden_state[torch.tensor(src_rows, device=device), torch.tensor(src_cols, device=device)]
        logp = torch.log_softmax(model.logits(hid).float(), -1)
        tok = logp.gather(-1, torch.tensor(targets, device=device).unsqueeze(-1)).squeeze(-1)
        scores = torch.zeros(k, device=device).index_add(0, torch.tensor(owner, device=device), tok)
    return list(scores.cpu().split([len(row) for row in cand_ids]))
