"""``ckf evaluate``: metrics on hand-computed toy cases, batched candidate scoring, the end-to-end report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch
from conftest import make_checkpoint

from ckf_dist.eval.scoring import TaskRows, evaluate_task, group_masks
from ckf_dist.model.scoring import sequential_logliks
from ckf_dist.stages.evaluate import load_test_rows, run_evaluate


def _rows(task, labels, users=None, items=None, cands=None):
    n = len(labels)
    return TaskRows(task, np.arange(n), np.asarray(users if users is not None else np.arange(n)),
                    np.asarray(items if items is not None else np.zeros(n, dtype=int)), np.asarray(labels, dtype=float),
                    None if cands is None else np.asarray(cands))


def test_every_method_is_scored_on_the_same_rows_hand_computed():
    # ctr: 5 rows; positives {.9, .4, .1} vs negatives {.2, .3} -> 4 of 6 pairs for "llm"
    tr = _rows("ctr", [1, 0, 1, 0, 1], users=[1, 1, 1, 2, 2])
    outs = {"llm": {"score": np.array([0.9, 0.2, 0.4, 0.3, 0.1])}, "pop": {"score": np.array([5, 1, 1, 1, 5.0])}}
    masks = {"all": np.ones(5, bool), "a": np.array([1, 1, 1, 0, 0], bool), "b": np.array([0, 0, 0, 1, 1], bool)}
    res, diffs = evaluate_task(tr, outs, masks, "llm", n_boot=200, seed=0, min_rows=2)
    assert res["llm"]["all"]["auc"]["value"] == pytest.approx(4 / 6)
    # pop: positives {5, 1, 5} vs negatives {1, 1}: 4 pairs won, 2 tied (half each) -> 5 / 6
    assert res["pop"]["all"]["auc"]["value"] == pytest.approx((2 * 2 + 0.5 * 2) / 6)
    assert res["llm"]["all"]["uauc"]["value"] == pytest.approx(0.5) and res["llm"]["all"]["uauc_users"] == 2
    assert res["llm"]["a"]["auc"]["value"] == 1.0 and res["llm"]["b"]["auc"]["value"] == 0.0
    assert res["llm"]["all"]["n"] == res["pop"]["all"]["n"] == 5 and res["pop"]["a"]["n"] == 3
    d = diffs["all"]["llm - pop"]["auc"]
    assert d["value"] == pytest.approx(4 / 6 - 5 / 6) and d["lo"] <= d["value"] <= d["hi"]

    # sequential: the true item's column is the label; ties by expected rank
    tr = _rows("sequential", [0, 2, 1], cands=[[4, 5, 6], [7, 8, 9], [1, 2, 3]])
    outs = {"m": {"greater": np.array([0, 1, 0]), "ties": np.array([0, 0, 2])}}
    res, _ = evaluate_task(tr, outs, {"all": np.ones(3, bool)}, None, n_boot=0, seed=0, min_rows=1)
    assert res["m"]["all"]["hr@1"]["value"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert res["m"]["all"]["mrr"]["value"] == pytest.approx((1 + 1 / 2 + (1 + 1 / 2 + 1 / 3) / 3) / 3)
    assert "hr@5" not in res["m"]["all"]          # HR@5 over 3 candidates is always 1: not reported

    # rating: expected and greedy predictions, RMSE/MAE on the same rows; a group below min_rows is too small
    tr = _rows("rating", [4, 2])
    outs = {"llm": {"pred": np.array([3.5, 3.0]), "greedy": np.array([4.0, 3.0])}, "mean": {"pred": np.array([3.0, 3.0])}}
    res, _ = evaluate_task(tr, outs, {"all": np.ones(2, bool), "one": np.array([1, 0], bool)}, "llm", 100, 0, 2)
    assert res["llm"]["all"]["rmse"]["value"] == pytest.approx(math.sqrt((0.25 + 1.0) / 2))
    assert res["llm"]["all"]["mae_greedy"]["value"] == pytest.approx(0.5)
    assert res["mean"]["all"]["mae"]["value"] == pytest.approx(1.0) and "rmse_greedy" not in res["mean"]["all"]
    assert res["llm"]["one"] == {"n": 1, "too_small": True}


def test_baselines_by_hand_on_a_toy_log():
    from ckf_dist.eval.baselines import Baselines, SplitLog

    # users 0, 1 warm, user 2 held out; split 0 = history, 2 = test
    log = SplitLog(user=np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]), item=np.array([0, 1, 2, 0, 1, 2, 0, 2, 1]),
                   rating=np.array([5, 3, 4, 4, 2, 1, 1, 3, 5.0]), split=np.array([0, 0, 2, 0, 0, 2, 0, 0, 2]),
                   warm=np.array([True, True, False]), n_users=3, n_items=3)
    assert log.user_history_counts().tolist() == [2, 2, 2] and log.item_training_counts().tolist() == [2, 2, 0]
    cf_user, cf_item = np.array([[1.0, 0], [0, 1], [1, 1]]), np.array([[2.0, 0], [0, 3], [1, 1]])
    base = Baselines.fit(log, cf_user, cf_item, "mf", seed=0)
    users, items = np.array([0, 1, 2]), np.array([2, 2, 1])
    r = base.rating(users, items)
    assert base.global_mean == pytest.approx((5 + 3 + 4 + 2) / 4)       # training ratings of warm users only
    assert r["user_mean"].tolist() == pytest.approx([4.0, 3.0, 2.0])    # held-out user: its known history
    assert r["item_mean"].tolist() == pytest.approx([3.5, 3.5, 2.5])    # item 2 never trained on: global mean
    c = base.ctr(users, items)
    assert c["mf"].tolist() == pytest.approx([1.0, 1.0, 3.0]) and c["popularity"].tolist() == [0, 0, 2]
    s = base.sequential(np.array([0]), np.array([[1, 0, -1]]))
    assert s["mf"].tolist() == [[0.0, 2.0, 2.0]] and s["popularity"].tolist() == [[2, 2, 2]]


def test_rating_regressor_learns_a_low_rank_signal():
    from ckf_dist.eval.baselines import SplitLog, fit_rating_mf

    rng = np.random.default_rng(0)
    n_u, n_i = 120, 80
    pu, qi = rng.normal(size=(n_u, 2)), rng.normal(size=(n_i, 2))
    bu = rng.normal(0, 0.5, n_u)
    users = np.repeat(np.arange(n_u), 30)
    items = np.concatenate([rng.choice(n_i, 30, replace=False) for _ in range(n_u)])
    rating = 3 + bu[users] + (pu[users] * qi[items]).sum(1) + rng.normal(0, 0.1, len(users))
    split = np.tile(np.r_[np.zeros(28), 1, 2], n_u).astype(np.int8)
    warm = np.ones(n_u, bool)
    warm[:10] = False                                 # ten users folded in from their history
    log = SplitLog(users, items, rating, split, warm, n_u, n_i)
    mf = fit_rating_mf(log, dim=4, reg=1.0)
    test = split == 2
    err = mf.predict(users[test], items[test]) - rating[test]
    user_mean = np.array([rating[(users == u) & (split == 0)].mean() for u in users[test]])
    assert np.sqrt((err ** 2).mean()) < 0.5 * np.sqrt(((user_mean - rating[test]) ** 2).mean())
    held = test & ~warm[users]
    err_held = mf.predict(users[held], items[held]) - rating[held]
    assert np.sqrt((err_held ** 2).mean()) < 0.6


def test_cold_groups_by_training_counts():
    tr = _rows("ctr", [1, 0, 1, 0], users=[0, 1, 2, 3], items=[0, 1, 2, 0])
    warm = np.array([True, True, True, False])
    user_hist = np.array([3, 50, 50, 40])
    item_train = np.array([100, 2, 30])
    m = group_masks(tr, warm, user_hist, item_train, cold_user_max=5, cold_item_max=10)
    assert m["user-cold"].tolist() == [True, False, False, False]
    assert m["item-cold"].tolist() == [False, True, False, False]
    assert m["unseen"].tolist() == [False, False, False, True]
    assert m["warm"].tolist() == [False, False, True, False] and m["all"].all()


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

    rows = load_test_rows(prepared_dataset.url, 0, 0)["sequential"][:3]
    batch = collate(rows, prepared_dataset.manifest["tokenizer"]["pad_id"])
    cands = [[list(map(int, c)) for c in r["cand_ids"]] for r in rows]
    got = sequential_logliks(tiny_model, batch, cands, stream)
    shared = sequential_logliks(tiny_model, batch, cands, stream, method="shared")
    full = sequential_logliks(tiny_model, batch, cands, stream, method="full")
    for g, s, f in zip(got, shared, full):
        assert g.shape == (len(cands[0]),)
        torch.testing.assert_close(g, s, rtol=0, atol=1e-4)
        torch.testing.assert_close(g, f, rtol=0, atol=1e-4)


def test_run_evaluate_end_to_end(prepared_dataset, tmp_path):
    from conftest import tiny_config

    from ckf_dist.data import load_cf_tables
    from ckf_dist.data.collate import collate
    from ckf_dist.metrics import auc
    from ckf_dist.model.scoring import ctr_scores
    from ckf_dist.stages.consolidate import consolidate, load_consolidated

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, randomize_bridge=True)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    cfg = tiny_config(prepared_dataset.url)
    cfg.eval.users_per_task, cfg.eval.batch_size, cfg.eval.max_new_tokens = 0, 5, 3
    cfg.eval.bootstrap, cfg.eval.min_group_rows = 200, 3
    report = run_evaluate(cfg, str(folder), out_dir=tmp_path / "eval", progress=False)

    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (tmp_path / "eval" / "eval.png").stat().st_size > 1000
    assert saved["step"] == 4 and saved["dataset_fingerprint"]["cf_sha256"]
    assert set(saved["results"]) == {"ctr", "sequential", "rating", "review"}
    assert set(saved["results"]["ctr"]) == {"ckf", "ckf-slots-removed", "mf", "popularity", "rating_mf"}
    assert set(saved["results"]["rating"]) >= {"ckf", "global_mean", "user_mean", "item_mean", "rating_mf"}
    rows = load_test_rows(prepared_dataset.url, 0, cfg.seed)
    for task, task_rows in rows.items():
        assert saved["rows"][task] == len(task_rows)
        ns = {m: saved["results"][task][m]["all"]["n"] for m in saved["results"][task]}
        assert set(ns.values()) == {len(task_rows)}, ns            # every column on the same rows
        cell = saved["results"][task]["ckf"]["all"]
        main = {"ctr": "auc", "sequential": "ndcg@5", "rating": "rmse", "review": "rougeL"}[task]
        assert cell[main]["lo"] <= cell[main]["value"] <= cell[main]["hi"]
        assert "ckf - ckf-slots-removed" in saved["diffs"][task]["all"]
    # leave-last-out: one ctr row per user, so UAUC is undefined and the table says why
    assert saved["results"]["ctr"]["ckf"]["all"]["uauc_undefined"]
    assert "uauc: not defined" in (tmp_path / "eval" / "eval.txt").read_text()

    # the ctr AUC is the AUC of the ctr head's P(Yes) on those rows, per variant, with the trained bridge
    cf = load_cf_tables(prepared_dataset.url)
    model, _, _ = load_consolidated(folder, None, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]))
    batch = collate(rows["ctr"], prepared_dataset.manifest["tokenizer"]["pad_id"])
    for variant, stream in (("ckf", "cf"), ("ckf-slots-removed", "text")):
        scores = ctr_scores(model, batch, prepared_dataset.manifest["answer_tokens"]["ctr"], stream)
        want = auc(batch["target"].tolist(), scores.tolist())
        got = report["results"]["ctr"][variant]["all"]["auc"]["value"]
        assert math.isnan(got) if math.isnan(want) else got == pytest.approx(want)

    # the per-row files recompute the table's cells: same rows, every method's output, the groups
    for task, task_rows in rows.items():
        table = pq.read_table(tmp_path / "eval" / f"rows_{task}.parquet").to_pydict()
        assert sorted(table["sample_id"]) == sorted(int(r["sample_id"]) for r in task_rows)
        assert {f"group:{g}" for g in ("all", "warm", "user-cold", "item-cold", "unseen")} <= set(table)
    ctr_rows = pq.read_table(tmp_path / "eval" / "rows_ctr.parquet").to_pydict()
    for method in saved["results"]["ctr"]:
        want = auc(ctr_rows["label"], ctr_rows[f"score:{method}"])
        got = saved["results"]["ctr"][method]["all"]["auc"]["value"]
        assert (got is None or math.isnan(got)) if math.isnan(want) else got == pytest.approx(want), method
    seq_rows = pq.read_table(tmp_path / "eval" / "rows_sequential.parquet").to_pydict()
    hits = [(g == 0) / (1 + e) for g, e in zip(seq_rows["greater:ckf"], seq_rows["ties:ckf"])]
    assert saved["results"]["sequential"]["ckf"]["all"]["hr@1"]["value"] == pytest.approx(sum(hits) / len(hits))

    # lm-prior: the plain backbone (no CKF, no adapters) ranking the same candidates after the text prompt
    from ckf_dist.metrics import expected_ranking, rank_counts_lists
    from ckf_dist.model import ModelConfig, load_backbone

    plain = load_backbone(ModelConfig(backbone="tiny-llama"))[0].eval()
    score_lists = []
    with torch.no_grad():
        for r in rows["sequential"]:
            prompt = list(map(int, r["text_ids"][:int(r["text_prompt_len"])]))
            row = []
            for cand in r["cand_ids"]:
                ids = torch.tensor([prompt + list(map(int, cand))])
                logp = torch.log_softmax(plain(ids).logits[0].float(), -1)
                row.append(float(sum(logp[len(prompt) - 1 + j, int(t)] for j, t in enumerate(cand))))
            score_lists.append(row)
    g, e = rank_counts_lists(score_lists, [int(r["label"]) for r in rows["sequential"]])
    want_mrr = float(expected_ranking(g, e, (1,))["mrr"].mean())
    assert saved["results"]["sequential"]["lm-prior"]["all"]["mrr"]["value"] == pytest.approx(want_mrr, abs=1e-6)

    # a checkpoint URL works too (consolidated on the fly), with the same numbers
    again = run_evaluate(cfg, ref.url, out_dir=tmp_path / "eval2", progress=False)
    assert again["results"]["rating"]["ckf"] == report["results"]["rating"]["ckf"]


def test_randomized_bridge_survives_consolidation(prepared_dataset, tmp_path):
    """CF-stream logits of the consolidated model equal the trained model's, and differ from a fresh bridge."""
    from ckf_dist.data import load_cf_tables
    from ckf_dist.data.collate import collate
    from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone
    from ckf_dist.model.scoring import ctr_scores
    from ckf_dist.stages.consolidate import consolidate, load_consolidated

    ref, trained = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, randomize_bridge=True, seed=4)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    cf = load_cf_tables(prepared_dataset.url)
    u, i = torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"])
    loaded, _, _ = load_consolidated(folder, None, u, i)
    rows = load_test_rows(prepared_dataset.url, 0, 0)["ctr"][:6]
    batch = collate(rows, prepared_dataset.manifest["tokenizer"]["pad_id"])
    answer = prepared_dataset.manifest["answer_tokens"]["ctr"]
    before, after = ctr_scores(trained, batch, answer, "cf"), ctr_scores(loaded, batch, answer, "cf")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    fresh = build_ckf_model(ModelConfig(backbone="tiny-llama"), load_backbone(ModelConfig(backbone="tiny-llama"))[0],
                            u, i, n_tasks=4).eval()
    fresh.load_state_dict({k: v for k, v in loaded.state_dict().items() if not k.startswith("bridge.")}, strict=False)
    assert (ctr_scores(fresh, batch, answer, "cf") - before).abs().max() > 1e-3


def test_evaluate_refuses_a_different_dataset_and_compares_a_text_only_run(prepared_dataset, tmp_path):
    from conftest import tiny_config

    from ckf_dist.errors import CKFError
    from ckf_dist.stages.consolidate import consolidate
    from ckf_dist.stages.prepare import run_prepare

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    text_ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, run="text-only", use_cf_slots=False)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    text_folder = consolidate(text_ref.url, tmp_path / "text-run", progress=False)
    cfg = tiny_config(prepared_dataset.url)
    cfg.eval.users_per_task, cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.bootstrap = 6, 6, 2, 100
    cfg.eval.min_group_rows, cfg.eval.lm_prior = 1, False
    report = run_evaluate(cfg, str(folder), out_dir=tmp_path / "eval", progress=False, compare=[str(text_folder)])
    assert "text-only" in report["results"]["ctr"] and "ckf - text-only" in report["diffs"]["ctr"]["all"]
    assert "no CF slots" in report["methods"]["text-only"]
    assert report["results"]["ctr"]["text-only"]["all"]["n"] == report["results"]["ctr"]["ckf"]["all"]["n"]

    # the same config prepared again elsewhere: the same content, the same fingerprint (accepted)
    from ckf_dist.data.shards import dataset_fingerprint

    same = tiny_config(tmp_path / "same")
    assert dataset_fingerprint(run_prepare(same, progress=False)) == dataset_fingerprint(prepared_dataset.manifest)
    same.eval = cfg.eval
    run_evaluate(same, str(folder), out_dir=tmp_path / "eval-same", progress=False)

    # the same source re-prepared with another seed: other split and CF tables -> refused, naming both
    other = tiny_config(tmp_path / "other")
    other.seed = 8
    run_prepare(other, progress=False)
    cfg2 = tiny_config(str(tmp_path / "other"))
    with pytest.raises(CKFError, match="not the dataset run 'ckpt-run'.*shards_sha256.*cf_sha256"):
        run_evaluate(cfg2, str(folder), out_dir=tmp_path / "eval3", progress=False)


def test_uauc_is_defined_under_the_temporal_split(tmp_path):
    from conftest import PreparedDataset, tiny_config

    from ckf_dist.stages.consolidate import consolidate
    from ckf_dist.stages.prepare import run_prepare

    cfg = tiny_config(tmp_path / "temporal", split="temporal", temporal_fractions=[0.6, 0.1, 0.3],
                      task_weights={"ctr": 4.0, "sequential": 1.0, "rating": 1.0, "review": 0.0})
    manifest = run_prepare(cfg, progress=False)
    data = PreparedDataset(cfg.data.output, manifest, cfg)
    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), data)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    cfg.eval.batch_size, cfg.eval.bootstrap, cfg.eval.min_group_rows, cfg.eval.lm_prior = 8, 200, 5, False
    report = run_evaluate(cfg, str(folder), out_dir=tmp_path / "eval", progress=False)
    cell = report["results"]["ctr"]["ckf"]["all"]
    assert cell["uauc_users"] >= 5 and "uauc_undefined" not in cell
    assert 0.0 <= cell["uauc"]["value"] <= 1.0 and cell["uauc"]["lo"] <= cell["uauc"]["value"] <= cell["uauc"]["hi"]
    assert report["options"]["split"] == "temporal"
    # several ctr rows per user: the bootstrap resamples users, so n (rows) exceeds the users drawn
    users = {int(r["user"]) for r in load_test_rows(cfg.data.output, 0, 0)["ctr"]}
    assert cell["n"] > len(users)


def test_rating_cf_dataset_prepares_trains_into_a_model_and_evaluates(tmp_path, capsys):
    """cf.loss: rating end to end: prepare names the fit, the tables are d + 2 wide and feed the
    bridge, and the evaluation scores ctr with the dataset's CF (``mf-rating``, u . v) beside the
    rating regressor, on the same rows."""
    from conftest import PreparedDataset, tiny_config

    from ckf_dist.data import load_cf_tables
    from ckf_dist.metrics import auc
    from ckf_dist.stages.consolidate import consolidate
    from ckf_dist.stages.prepare import run_prepare

    cfg = tiny_config(tmp_path / "data")
    cfg.cf.loss = "rating"
    manifest = run_prepare(cfg, progress=True)
    assert "rating loss, ALS, reg" in capsys.readouterr().out
    assert manifest["cf"]["loss"] == "rating" and manifest["cf"]["dim"] == 10
    cf = load_cf_tables(str(tmp_path / "data"))
    assert cf["user"].shape[1] == cf["item"].shape[1] == 10

    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), PreparedDataset(str(tmp_path / "data"), manifest, cfg),
                             randomize_bridge=True)
    folder = consolidate(ref.url, tmp_path / "run", progress=False)
    cfg.eval.users_per_task, cfg.eval.batch_size, cfg.eval.bootstrap, cfg.eval.min_group_rows = 0, 8, 50, 3
    cfg.eval.lm_prior = False
    report = run_evaluate(cfg, str(folder), out_dir=tmp_path / "eval", progress=False)
    ctr = report["results"]["ctr"]
    assert {"ckf", "mf-rating", "rating_mf", "popularity"} <= set(ctr)
    assert len({ctr[m]["all"]["n"] for m in ctr}) == 1
    rows = pq.read_table(tmp_path / "eval" / "rows_ctr.parquet").to_pydict()
    users, items = np.array(rows["user"]), np.array(rows["item"])
    uv = (cf["user"][users] * cf["item"][items]).sum(-1)
    assert np.allclose(rows["score:mf-rating"], uv, atol=1e-5)
    assert ctr["mf-rating"]["all"]["auc"]["value"] == pytest.approx(auc(rows["label"], uv))
