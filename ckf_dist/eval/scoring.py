"""Scoring test rows with a CKF model and turning the records into per-group metrics.

:func:`score_rows` runs the deterministic task heads of :mod:`ckf_dist.model.scoring` on
collated rows and keeps, per row, what the task's metrics need; :func:`task_metrics` computes
them for all, warm and cold users.
"""

from __future__ import annotations

from ckf_dist.eval.metrics import auc, hit_ndcg, rank_of_true, rmse_mae, text_metrics, uauc

GROUPS = ("all", "warm", "cold")
KS = (1, 5, 10)


def score_rows(model, task: str, rows: list, stream: str, ctx: dict, batch_size: int) -> list[dict]:
    """One record per row: user, warm and what the task's metrics need."""
    from ckf_dist.data.collate import collate
    from ckf_dist.model.scoring import ctr_scores, greedy_generate, rating_scores, sequential_logliks

    records = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate(chunk, ctx["pad_id"])
        base = [{"user": int(r["user"]), "warm": bool(r["warm"]), "label": float(r["label"])} for r in chunk]
        if task == "ctr":
            for rec, s in zip(base, ctr_scores(model, batch, ctx["answer_tokens"]["ctr"], stream).tolist()):
                rec["score"] = s
        elif task == "rating":
            exp, greedy = rating_scores(model, batch, ctx["answer_tokens"]["rating"], stream)
            for rec, e, g in zip(base, exp.tolist(), greedy.tolist()):
                rec["expected"], rec["greedy"] = e, g
        elif task == "sequential":
            cands = [[list(map(int, c)) for c in r["cand_ids"]] for r in chunk]
            for rec, s in zip(base, sequential_logliks(model, batch, cands, stream)):
                rec["rank"] = rank_of_true(s.tolist(), int(rec["label"]))
        elif task == "review":
            out = greedy_generate(model, batch, ctx["max_new_tokens"], ctx["eos_id"], stream, ctx["pad_id"])
            for rec, toks, r in zip(base, out, chunk):
                rec["hyp"] = ctx["tokenizer"].decode(toks, skip_special_tokens=True).strip()
                rec["ref"] = str(r["answer_text"])
        records.extend(base)
    return records


def task_metrics(task: str, records: list[dict]) -> dict[str, dict]:
    """``{group: {metric: value, "n": rows}}`` for all / warm / cold users (empty groups left out)."""
    out = {}
    for group in GROUPS:
        recs = [r for r in records if group == "all" or r["warm"] == (group == "warm")]
        if not recs:
            continue
        if task == "ctr":
            labels, scores = [r["label"] for r in recs], [r["score"] for r in recs]
            u, n_users = uauc([r["user"] for r in recs], labels, scores)
            m = {"auc": auc(labels, scores), "uauc": u, "uauc_users": n_users}
        elif task == "rating":
            truth = [r["label"] for r in recs]
            m = rmse_mae(truth, [r["expected"] for r in recs])
            m.update({f"{k}_greedy": v for k, v in rmse_mae(truth, [r["greedy"] for r in recs]).items()})
        elif task == "sequential":
            m = hit_ndcg([r["rank"] for r in recs], KS)
        else:
            m = text_metrics([r["ref"] for r in recs], [r["hyp"] for r in recs])
        m["n"] = len(recs)
        out[group] = m
    return out
