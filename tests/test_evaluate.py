"""``ckf evaluate``: metrics on hand-computed toy cases, batched candidate scoring, the end-to-end report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_checkpoint

from ckf_dist.eval.report import format_table
from ckf_dist.eval.scoring import task_metrics
from ckf_dist.model.scoring import sequential_logliks
from ckf_dist.stages.evaluate import load_test_rows, run_evaluate


def test_task_metrics_hand_computed():
    ctr = [dict(user=1, warm=True, label=1, score=0.9), dict(user=1, warm=True, label=0, score=0.2),
           dict(user=1, warm=True, label=1, score=0.4), dict(user=2, warm=False, label=0, score=0.3),
           dict(user=2, warm=False, label=1, score=0.1)]
    m = task_metrics("ctr", ctr)
    # positives {.9, .4, .1} vs negatives {.2, .3}: 4 of 6 pairs ordered; user 1: 2/2, user 2: 0/1
    assert m["all"]["auc"] == pytest.approx(4 / 6) and m["all"]["uauc"] == pytest.approx(0.5)
    assert m["all"]["n"] == 5 and m["all"]["uauc_users"] == 2
    assert m["warm"]["auc"] == 1.0 and m["cold"]["auc"] == 0.0 and m["cold"]["n"] == 2

    seq = [dict(user=1, warm=True, label=0, rank=0), dict(user=2, warm=True, label=3, rank=2),
           dict(user=3, warm=False, label=1, rank=7)]
    m = task_metrics("sequential", seq)["all"]
    assert m["hr@1"] == pytest.approx(1 / 3) and m["hr@5"] == pytest.approx(2 / 3) and m["hr@10"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(9)) / 3)
    assert task_metrics("sequential", seq)["cold"]["hr@5"] == 0.0

    rating = [dict(user=1, warm=True, label=4, expected=3.5, greedy=4), dict(user=2, warm=True, label=2, expected=3.0, greedy=3)]
    m = task_metrics("rating", rating)
    assert m["all"]["rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2)) and m["all"]["mae"] == pytest.approx(0.75)
    assert m["all"]["rmse_greedy"] == pytest.approx(math.sqrt(0.5)) and m["all"]["mae_greedy"] == pytest.approx(0.5)
    assert "cold" not in m

    review = [dict(user=1, warm=True, label=0, ref="a fine film indeed", hyp="a fine film indeed")]
    assert task_metrics("review", review)["all"]["rougeL"] == pytest.approx(100.0)

    table = format_table({"ckf": {"ctr": task_metrics("ctr", ctr)}}, {"mf": {"ctr": {"all": {"auc": 0.5, "n": 9}}}})
    assert "ctr" in table and "0.6667" in table and "0.5000" in table


@pytest.fixture(scope="module")
def tiny_model(prepared_dataset):
    from ckf_dist.data import load_cf_tables
    from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone
    from ckf_dist.model.testing import randomize_adapters

    cfg = ModelConfig(backbone="tiny-llama")
    bb, _ = load_backbone(cfg)
    cf = load_cf_tables(prepared_dataset.url)
    model = build_ckf_model(cfg, bb, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"])).eval()
    randomize_adapters(model, seed=3, std=0.2)
    return model


@pytest.mark.parametrize("stream", ["cf", "text"])
def test_batched_candidates_match_per_user_and_full_forward(prepared_dataset, tiny_model, stream):
    from ckf_dist.data.collate import collate
    from ckf_dist.model.scoring import sequential_scores

    rows = load_test_rows(prepared_dataset.url, 0, 0)["sequential"][:3]
    batch = collate(rows, prepared_dataset.manifest["tokenizer"]["pad_id"])
    cands = [[list(map(int, c)) for c in r["cand_ids"]] for r in rows]
    got = sequential_logliks(tiny_model, batch, cands, stream)
    shared = sequential_scores(tiny_model, batch, cands, stream, shared_prefix=True)
    full = sequential_scores(tiny_model, batch, cands, stream, shared_prefix=False)
    for g, s, f in zip(got, shared, full):
        assert g.shape == (len(cands[0]),)
        torch.testing.assert_close(g, s, rtol=0, atol=1e-4)
        torch.testing.assert_close(g, f, rtol=0, atol=1e-4)


def test_run_evaluate_end_to_end(prepared_dataset, tmp_path):
    from conftest import tiny_config

    from ckf_dist.stages.consolidate import consolidate, load_consolidated
    from ckf_dist.data import load_cf_tables
    from ckf_dist.data.collate import collate
    from ckf_dist.eval.metrics import auc
    from ckf_dist.model.scoring import ctr_scores

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    cfg = tiny_config(prepared_dataset.url)
    cfg.eval.users_per_task, cfg.eval.batch_size, cfg.eval.max_new_tokens = 4, 3, 3
    report = run_evaluate(cfg, str(folder), out_dir=tmp_path / "eval", progress=False)

    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    assert set(saved["results"]) == {"ckf", "text_only"} and saved["step"] == 4
    assert set(saved["results"]["ckf"]) == {"ctr", "sequential", "rating", "review"}
    assert "mf" in saved["baselines"] and "popularity" in saved["baselines"]
    rows = load_test_rows(prepared_dataset.url, 4, cfg.seed)
    for task, task_rows in rows.items():
        assert len({r["user"] for r in task_rows}) <= 4 and saved["rows"][task] == len(task_rows)
        assert saved["results"]["ckf"][task]["all"]["n"] == len(task_rows)
        n_warm = sum(bool(r["warm"]) for r in task_rows)
        assert saved["results"]["ckf"][task].get("warm", {}).get("n", 0) == n_warm

    # the report's ctr AUC is the AUC of the ctr head's P(Yes) on those rows, per variant
    cf = load_cf_tables(prepared_dataset.url)
    model, _, _ = load_consolidated(folder, None, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]))
    batch = collate(rows["ctr"], prepared_dataset.manifest["tokenizer"]["pad_id"])
    for variant, stream in (("ckf", "cf"), ("text_only", "text")):
        scores = ctr_scores(model, batch, prepared_dataset.manifest["answer_tokens"]["ctr"], stream)
        want = auc(batch["target"].tolist(), scores.tolist())
        got = report["results"][variant]["ctr"]["all"]["auc"]
        assert math.isnan(got) if math.isnan(want) else got == pytest.approx(want)

    # a checkpoint URL works too (consolidated on the fly), with the same numbers
    again = run_evaluate(cfg, ref.url, out_dir=tmp_path / "eval2", progress=False)
    assert again["results"]["ckf"]["rating"] == report["results"]["ckf"]["rating"]
