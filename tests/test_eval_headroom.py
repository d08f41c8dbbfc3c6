"""Headroom: the cross-fitted stack finds information a base score lacks, and none where there is none."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ckf_dist.eval.headroom import (conditional_hits, difference, difference_over_pairs, effect, fit_logistic, headroom,
                                    hits_at_1, main, percentile_ranks)


def synthetic_rows(n: int = 2000, seed: int = 0) -> dict:
    """Labels from two independent signals; ``base`` sees only the first, ``cf`` only the second."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    labels = (a + b + rng.normal(scale=0.5, size=n) > 0).astype(float)
    return {"user": np.arange(n), "label": labels, "score:base": 1 / (1 + np.exp(-a)),
            "score:cf": b * 3.0 + 7.0, "score:noise": rng.normal(size=n), "score:copy": a ** 3}


def test_percentile_ranks_are_monotone_with_shared_ties():
    r = percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0, 5.0]))
    assert r.tolist() == [0.75, 0.0, 0.375, 0.375, 1.0]


def test_logistic_fit_recovers_the_generating_weights():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 2))
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 + 2.0 * x[:, 0] - 1.0 * x[:, 1])))).astype(float)
    w = fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, [0.5, 2.0, -1.0], atol=0.1)


def test_a_complementary_feature_shows_as_a_significant_gain():
    h = headroom(synthetic_rows(), "base", ["cf"], n_boot=300)
    assert h["gain"]["excludes_zero"] and h["gain"]["lo"] > 0.05
    assert h["stack_auc"]["value"] > h["base_auc"]["value"] + 0.1
    assert h["n"] == 2000 and h["weights"]["cf"] > 0


@pytest.mark.parametrize("extra", ["noise", "copy"])
def test_noise_or_a_monotone_copy_adds_nothing(extra):
    """A feature with no information, or the base's own information again, gains ~0."""
    h = headroom(synthetic_rows(), "base", [extra], n_boot=300)
    assert abs(h["gain"]["value"]) < 0.01 and h["gain"]["lo"] <= 0.005


def test_command_line_reads_an_evaluations_rows(tmp_path, capsys):
    rows = synthetic_rows(400)
    pq.write_table(pa.table(rows), tmp_path / "rows_ctr.parquet")
    assert main([str(tmp_path), "--base", "base", "--add", "cf"]) == 0
    out = capsys.readouterr().out
    assert "400 rows" in out and "gain (paired)" in out and "base + cf" in out
    assert main([str(tmp_path), "--base", "text-only"]) == 2
    assert "no ctr scores for ['text-only', 'mf', 'popularity']" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "rows_ctr.parquet not found" in capsys.readouterr().err


def test_effect_follows_what_was_added_and_nothing_else():
    """``with`` = ``without`` pushed by the cf signal: the effect correlates with cf and the label,
    not with noise; its mean and spread are the push's."""
    rows = synthetic_rows(2000)
    base = np.asarray(rows["score:base"])
    push = 0.3 * (rows["score:cf"] - 7.0) / 3.0 + 0.1                   # 0.3 * b + 0.1 in logits
    rows["score:with-cf"] = 1 / (1 + np.exp(-(np.log(base / (1 - base)) + push)))
    e = effect(rows, "with-cf", "base", ["cf", "noise"], n_boot=300)
    assert e["n"] == 2000 and abs(e["mean"]["value"] - 0.1) < 0.03 and abs(e["sd"] - 0.3) < 0.03
    assert e["mean"]["lo"] > 0
    assert e["cf"]["value"] > 0.99 and e["cf"]["lo"] > 0.98               # the push is a function of cf
    assert e["label"]["lo"] > 0.2                                       # and cf predicts the label
    assert e["noise"]["lo"] < 0 < e["noise"]["hi"] and abs(e["noise"]["value"]) < 0.06
    with pytest.raises(ValueError, match="not probabilities"):
        effect(rows, "cf", "base", [])


def test_command_line_effect(tmp_path, capsys):
    rows = synthetic_rows(400)
    rows["score:base2"] = np.clip(np.asarray(rows["score:base"]) + 0.01, 0, 1)
    pq.write_table(pa.table(rows), tmp_path / "rows_ctr.parquet")
    assert main([str(tmp_path), "--effect", "base2", "base", "--add", "cf"]) == 0
    out = capsys.readouterr().out
    assert "logit(base2) - logit(base) on 400 ctr rows" in out and "rank correlation with cf" in out
    assert main([str(tmp_path), "--effect", "base2", "ckf"]) == 2
    assert "no ctr scores for ['ckf'" in capsys.readouterr().err
    assert main([str(tmp_path), "--diff", "base2", "base"]) == 0
    assert "base2 - base" in capsys.readouterr().out


def test_difference_is_paired_over_the_same_rows():
    """A score that also sees the cf signal beats base by a margin the paired interval resolves;
    a score against itself differs by exactly 0; the AUCs are those of the metric."""
    from ckf_dist.metrics import auc

    rows = synthetic_rows(2000)
    base = np.asarray(rows["score:base"])
    rows["score:both"] = 1 / (1 + np.exp(-(np.log(base / (1 - base)) + (rows["score:cf"] - 7.0) / 3.0)))
    d = difference(rows, "both", "base", n_boot=300)
    assert d["auc_a"]["value"] == pytest.approx(auc(rows["label"].tolist(), rows["score:both"].tolist()))
    assert d["diff"]["excludes_zero"] and d["diff"]["lo"] > 0.05
    same = difference(rows, "base", "base", n_boot=100)
    assert same["diff"]["value"] == 0 and same["diff"]["lo"] == same["diff"]["hi"] == 0


def test_difference_over_pairs_pools_seeds_on_the_same_draws(tmp_path, capsys):
    """Two pairs (two seeds): each pair's entry is exactly the one-pair difference (same draws);
    the mean is the mean of the pairs' differences, narrower than either pair's interval when
    the pairs' noise is independent; pairs of opposite sign are flagged."""
    rows = synthetic_rows(1500)
    rng = np.random.default_rng(3)
    base = np.asarray(rows["score:base"])
    lg = np.log(base / (1 - base))
    signal = (rows["score:cf"] - 7.0) / 3.0
    for name, push in (("a1", 0.25), ("a2", 0.25), ("worse", -0.25)):
        rows[f"score:{name}"] = lg + push * signal + rng.normal(scale=0.8, size=len(base))
    for name in ("b1", "b2"):
        rows[f"score:{name}"] = lg + rng.normal(scale=0.8, size=len(base))
    d = difference_over_pairs(rows, [("a1", "b1"), ("a2", "b2")], n_boot=300)
    for got, (a, b) in zip(d["pairs"], [("a1", "b1"), ("a2", "b2")]):
        one = difference(rows, a, b, n_boot=300)
        assert got["diff"] == one["diff"] and got["auc_a"] == one["auc_a"]
    pair_values = [p["diff"]["value"] for p in d["pairs"]]
    assert d["mean"]["value"] == pytest.approx(np.mean(pair_values))
    assert d["same_sign"] and d["mean"]["excludes_zero"] and d["mean"]["lo"] > 0
    widths = [p["diff"]["hi"] - p["diff"]["lo"] for p in d["pairs"]]
    assert d["mean"]["hi"] - d["mean"]["lo"] < min(widths)
    mixed = difference_over_pairs(rows, [("a1", "b1"), ("worse", "b2")], n_boot=300)
    assert not mixed["same_sign"] and mixed["spread"] > 0.02
    with pytest.raises(KeyError, match="missing-method"):
        difference_over_pairs(rows, [("a1", "missing-method")], n_boot=10)

    path = tmp_path / "rows_ctr.parquet"
    pq.write_table(pa.table({k: np.asarray(v) for k, v in rows.items()}), path)
    assert main([str(tmp_path), "--diff", "a1", "b1", "worse", "b2"]) == 0
    out = capsys.readouterr().out
    assert "2 pairs" in out and "mean of the 2 differences" in out and "DIFFERENT signs" in out
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "--diff", "a1", "b1", "a2"])
    assert exc.value.code == 2 and "in pairs" in capsys.readouterr().err


def test_conditional_hits_put_a_cf_reading_gain_where_cf_is_right(tmp_path, capsys):
    """Sequential rows (10 candidates): ``cf`` ranks the truth first on half of them; ``reader``
    follows cf where cf is right and is otherwise ``text``. Its gain over ``text`` lies on the rows
    where cf is right (interval above 0) and is exactly 0 on the others; ties count 1 / (ties + 1)."""
    rng = np.random.default_rng(1)
    n = 800
    cf_right = rng.random(n) < 0.5
    text_hit = rng.random(n) < 0.2
    reader_hit = np.where(cf_right, rng.random(n) < 0.6, text_hit)
    rows = {"user": np.arange(n), "label": np.zeros(n),
            "greater:cf": np.where(cf_right, 0, 3), "ties:cf": np.zeros(n, dtype=int),
            "greater:text": np.where(text_hit, 0, 2), "ties:text": np.zeros(n, dtype=int),
            "greater:reader": np.where(reader_hit, 0, 2), "ties:reader": np.zeros(n, dtype=int)}
    np.testing.assert_allclose(hits_at_1({"greater:m": np.array([0, 0, 2]), "ties:m": np.array([0, 3, 0])}, "m"),
                               [1.0, 0.25, 0.0])
    c = conditional_hits(rows, "reader", "text", "cf", n_boot=300)
    right, wrong = c["groups"]["cf right"], c["groups"]["cf wrong"]
    assert right["n"] == cf_right.sum() and wrong["n"] == n - cf_right.sum()
    assert right["hr"]["diff"]["excludes_zero"] and right["hr"]["diff"]["lo"] > 0.2
    assert wrong["hr"]["diff"]["value"] == 0 and not wrong["hr"]["diff"]["excludes_zero"]
    assert c["groups"]["all"]["hr"]["a"]["value"] == pytest.approx(reader_hit.mean())
    # ranks: the reader lifts the truth only where cf ranks it first, so the lift follows cf
    assert right["rank"]["diff"]["hi"] < 0 and wrong["rank"]["diff"]["value"] == 0
    assert c["corr"]["lo"] > 0.1
    blind = conditional_hits(rows, "text", "reader", "text", n_boot=200)
    assert blind["groups"]["all"]["rank"]["diff"]["value"] > 0
    pq.write_table(pa.table(rows), tmp_path / "rows_sequential.parquet")
    assert main([str(tmp_path), "--diff", "reader", "text", "--given", "cf"]) == 0
    out = capsys.readouterr().out
    assert "split by whether cf ranks the true item first" in out and "cf right" in out and "mean rank" in out
    assert main([str(tmp_path), "--diff", "reader", "lm", "--given", "cf"]) == 2
    assert "no sequential ranks for 'lm'" in capsys.readouterr().err
