"""Headroom: could other per-row features raise a CTR scorer's AUC on the same rows?

CKF fuses CF knowledge into an LLM. If it does not beat its text-only variant, two causes are
possible: the bridge fails to deliver information the CF side has, or the CF side has no
information that the text model lacks. This module tells them apart on an evaluation's own
rows (``rows_ctr.parquet``, written by ``ckf evaluate``):

1. every feature (the base method's score, and e.g. the CF model's ``u . v`` and item
   popularity) becomes its percentile rank over the rows (monotone, so no feature's AUC
   changes, and no label is used);
2. a logistic regression on the ranks is fitted on K-1 folds of users and scores the held-out
   fold (cross-fitting: no row is scored by a model that saw its label);
3. the stack's AUC and the base method's AUC on the same rows, with the paired user-level
   bootstrap interval of the gain (:mod:`ckf_dist.eval.bootstrap`; the fits are not redone per
   replicate, so the interval covers the rows' sampling, not the fitting).

A gain whose interval lies above 0 says the features hold information the base score lacks (a
fusion could use it); a gain near 0 with a tight interval says they add nothing a linear
combination can find.

``--effect A B`` asks what a component delivers: the per-row effect ``logit(p_A) - logit(p_B)``
of two scorings of the same rows (``ckf`` and ``ckf-slots-removed``: what the CF slots change),
its size beside the spread of A's logits, and its rank correlation with the label and with
other scores (does the slots' push follow popularity, ``u . v``?), each with a user-level
bootstrap interval (ranks fixed over the rows, correlations re-weighted per replicate).

    python -m ckf_dist.eval.headroom runs/study/ctr-cpu --base text-only --add mf popularity
    python -m ckf_dist.eval.headroom runs/study/ctr-cpu --effect ckf ckf-slots-removed --add mf popularity
    python -m ckf_dist.eval.headroom runs/study/ctr-cpu --diff joint-normalize text-only
    python -m ckf_dist.eval.headroom runs/study/ctr-rating-cpu --diff ckf text-only ckf-seed7 text-only-seed7
    python -m ckf_dist.eval.headroom runs/study/seq-cpu --diff ckf text-only --given mf

``--diff`` with more than one pair (one per training seed) prints each pair's paired difference
and their mean with an interval over the same user draws, and whether the pairs agree in sign.

``--given M`` (with ``--diff A B``) asks the same of sequential recommendation: HR@1 of A and B
on all rows and split by whether M ranks the true item first, each with the paired interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ckf_dist.eval.bootstrap import Resampler, auc_stat, mean_stat, paired, replicate, summarize
from ckf_dist.metrics import auc


def percentile_ranks(x: np.ndarray) -> np.ndarray:
    """Each value's mean rank among ``x`` scaled to [0, 1] (ties share their mean rank)."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - counts + (counts - 1) / 2.0     # 0-based mean rank of each distinct value
    return mid[inverse] / max(1, len(inverse) - 1)


def _require_scores(rows: dict, methods: list[str]) -> None:
    """A KeyError naming the methods without a ``score:<method>`` column, and those there are."""
    missing = [m for m in methods if f"score:{m}" not in rows]
    if missing:
        have = sorted(c.split(":", 1)[1] for c in rows if c.startswith("score:"))
        raise KeyError(f"no ctr scores for {missing}; the rows have {have}")


def _cell(c: dict, sign: str = "") -> str:
    """``value [lo, hi]`` to 3 decimals (``sign="+"``: signed)."""
    return f"{c['value']:{sign}.3f} [{c['lo']:{sign}.3f}, {c['hi']:{sign}.3f}]"


def _design(x: np.ndarray) -> np.ndarray:
    """``x`` with an intercept column in front."""
    return np.hstack([np.ones((len(x), 1)), x])


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Weights (intercept first) of an L2-regularised logistic regression, by Newton's method."""
    a = _design(x)
    w = np.zeros(a.shape[1])
    reg = l2 * len(x) * np.diag([0.0] + [1.0] * x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ w)))
        grad = a.T @ (p - y) + reg @ w
        hess = (a * (p * (1 - p))[:, None]).T @ a + reg + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def stacked_scores(features: np.ndarray, labels: np.ndarray, users: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold logistic scores of ``features [n, f]`` with folds drawn over users."""
    uniq, row_user = np.unique(users, return_inverse=True)
    fold_of_user = np.random.default_rng(seed).permutation(len(uniq)) % folds
    fold = fold_of_user[row_user]
    out = np.empty(len(labels))
    for k in range(folds):
        test = fold == k
        out[test] = _design(features[test]) @ fit_logistic(features[~test], labels[~test])
    return out


def headroom(rows: dict, base: str, extras: list[str], folds: int = 5, seed: int = 42, n_boot: int = 1000) -> dict:
    """The base method's AUC, the cross-fitted stack's AUC with ``extras``, and the paired gain."""
    labels = np.asarray(rows["label"], dtype=np.float64)
    users = np.asarray(rows["user"], dtype=np.int64)
    _require_scores(rows, [base, *extras])
    if len(np.unique(labels)) < 2:
        raise ValueError("headroom: the rows have a single label; AUC is undefined")
    base_scores = np.asarray(rows[f"score:{base}"], dtype=np.float64)
    features = np.stack([percentile_ranks(rows[f"score:{m}"]) for m in [base, *extras]], axis=1)
    stack = stacked_scores(features, labels, users, folds, seed)
    res = Resampler(users, n_boot, seed, "headroom")
    reps = replicate(res, {"base": {"auc": auc_stat(labels, base_scores)}, "stack": {"auc": auc_stat(labels, stack)}})
    point_base, point_stack = auc(labels.tolist(), base_scores.tolist()), auc(labels.tolist(), stack.tolist())
    weights = fit_logistic(features, labels)
    return {"n": int(len(labels)), "base": base, "extras": list(extras), "folds": folds,
            "base_auc": summarize(point_base, reps["base"]["auc"]),
            "stack_auc": summarize(point_stack, reps["stack"]["auc"]),
            "gain": paired(point_stack, point_base, reps["stack"]["auc"], reps["base"]["auc"]),
            "weights": {"intercept": float(weights[0]),
                        **{m: float(v) for m, v in zip([base, *extras], weights[1:])}}}


def _logit(p: np.ndarray, what: str) -> np.ndarray:
    if np.nanmin(p) < 0 or np.nanmax(p) > 1:
        raise ValueError(f"--effect: {what}'s scores are not probabilities in [0, 1]")
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def corr_stat(x: np.ndarray, y: np.ndarray):
    """Pearson correlation of ``x`` and ``y`` under each replicate's row weights."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def stat(counts, w):
        sw = w.sum(1)
        mx, my = (w @ x) / sw, (w @ y) / sw
        cov = (w @ (x * y)) / sw - mx * my
        vx, vy = (w @ (x * x)) / sw - mx ** 2, (w @ (y * y)) / sw - my ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            return cov / np.sqrt(vx * vy)
    return stat


def effect(rows: dict, with_: str, without: str, against: list[str], seed: int = 42, n_boot: int = 1000) -> dict:
    """What ``with_`` changes over ``without`` row by row: the logit difference's mean and spread
    (beside the spread of ``with_``'s logits), and its rank correlation with the label and with
    each score in ``against``, with user-level bootstrap intervals."""
    _require_scores(rows, [with_, without, *against])
    a = _logit(np.asarray(rows[f"score:{with_}"], dtype=np.float64), with_)
    delta = a - _logit(np.asarray(rows[f"score:{without}"], dtype=np.float64), without)
    users = np.asarray(rows["user"], dtype=np.int64)
    ranked = percentile_ranks(delta)
    targets = {"label": np.asarray(rows["label"], dtype=np.float64),
               **{m: percentile_ranks(rows[f"score:{m}"]) for m in against}}
    stats = {"mean": mean_stat(delta), **{t: corr_stat(ranked, v) for t, v in targets.items()}}
    reps = replicate(Resampler(users, n_boot, seed, "effect"), {"effect": stats})["effect"]
    point = {"mean": float(delta.mean()), **{t: float(corr_stat(ranked, v)(None, np.ones((1, len(v))))[0])
                                            for t, v in targets.items()}}
    return {"n": int(len(delta)), "with": with_, "without": without, "sd": float(delta.std()),
            "sd_scores": float(a.std()), **{k: summarize(point[k], reps[k]) for k in stats}}


def difference(rows: dict, a: str, b: str, seed: int = 42, n_boot: int = 1000) -> dict:
    """AUC of ``a`` and of ``b`` on the same rows and the paired difference ``a - b`` (user-level
    bootstrap): for two methods neither of which is a study's reference."""
    d = difference_over_pairs(rows, [(a, b)], seed, n_boot)
    return {"n": d["n"], **d["pairs"][0]}


def difference_over_pairs(rows: dict, pairs: list[tuple[str, str]], seed: int = 42, n_boot: int = 1000) -> dict:
    """The paired AUC difference of each ``(a, b)`` pair (e.g. CKF and text-only trained with the
    same seed, one pair per seed) and their mean, every method resampled with the *same* user
    draws: the mean's interval covers the rows' sampling of all pairs together. It does not model
    the spread between pairs (two or three seeds cannot estimate a variance), which is reported
    beside it: a mean whose pairs disagree in sign is no result, whatever its interval."""
    if not pairs:
        raise ValueError("no pairs to compare")
    methods = sorted({m for pair in pairs for m in pair})
    _require_scores(rows, methods)
    labels = np.asarray(rows["label"], dtype=np.float64)
    scores = {m: np.asarray(rows[f"score:{m}"], dtype=np.float64) for m in methods}
    reps = replicate(Resampler(np.asarray(rows["user"], dtype=np.int64), n_boot, seed, "difference"),
                     {m: {"auc": auc_stat(labels, scores[m])} for m in methods})
    reps = {m: r["auc"] for m, r in reps.items()}
    point = {m: auc(labels.tolist(), scores[m].tolist()) for m in methods}
    out = [{"a": a, "b": b, "auc_a": summarize(point[a], reps[a]), "auc_b": summarize(point[b], reps[b]),
            "diff": paired(point[a], point[b], reps[a], reps[b])} for a, b in pairs]
    a_side, b_side = zip(*pairs)
    # the mean of the differences is the difference of the means, on the same draws
    mean = paired(float(np.mean([point[m] for m in a_side])), float(np.mean([point[m] for m in b_side])),
                  np.mean([reps[m] for m in a_side], axis=0), np.mean([reps[m] for m in b_side], axis=0))
    diffs = np.array([point[a] - point[b] for a, b in pairs])
    return {"n": int(len(labels)), "pairs": out, "mean": mean,
            "spread": float(diffs.max() - diffs.min()), "same_sign": bool(np.all(diffs > 0) or np.all(diffs < 0))}


def _ranks(rows: dict, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sequential row: ``method``'s expected HR@1 (1 / (ties + 1) when no candidate scored above
    the true item, else 0) and the true item's expected rank (1 + above + ties / 2), ties broken
    at random as the evaluation's table does."""
    missing = [k for k in (f"greater:{method}", f"ties:{method}") if k not in rows]
    if missing:
        have = sorted(c.split(":", 1)[1] for c in rows if c.startswith("greater:"))
        raise KeyError(f"no sequential ranks for {method!r}; the rows have {have}")
    greater, ties = (np.asarray(rows[f"{k}:{method}"], dtype=np.float64) for k in ("greater", "ties"))
    return (greater == 0) / (ties + 1.0), 1.0 + greater + ties / 2.0


def hits_at_1(rows: dict, method: str) -> np.ndarray:
    """Per sequential row, the expected HR@1 of ``method`` (see :func:`_ranks`)."""
    return _ranks(rows, method)[0]


def conditional_hits(rows: dict, a: str, b: str, given: str, seed: int = 42, n_boot: int = 1000) -> dict:
    """HR@1 and the true item's mean rank for ``a`` and ``b``, and the paired differences ``a - b``,
    on all sequential rows, on the rows where ``given`` (e.g. the CF model) ranks the true item
    first, and on the others; plus the correlation, over all rows, of how much ``a`` lifts the
    true item over ``b`` (rank of b minus rank of a) with how high ``given`` ranks it.

    If ``a`` gains over ``b`` by reading what ``given`` knows (CF slots against text only), the
    gain sits on the rows where ``given`` is right and grows with ``given``'s rank of the truth;
    a gain spread evenly is not that."""
    (ha, ra), (hb, rb), (hg, rg) = _ranks(rows, a), _ranks(rows, b), _ranks(rows, given)
    users = np.asarray(rows["user"], dtype=np.int64)
    out = {"n": int(len(ha)), "a": a, "b": b, "given": given, "groups": {}}
    for name, mask in (("all", np.ones(len(ha), dtype=bool)), (f"{given} right", hg == 1.0),
                       (f"{given} wrong", hg < 1.0)):
        if not mask.any():
            continue
        reps = replicate(Resampler(users[mask], n_boot, seed, f"hits-{name}"),
                         {m: {"hr": mean_stat(h[mask]), "rank": mean_stat(r[mask])} for m, h, r in (("a", ha, ra), ("b", hb, rb))})
        group = {"n": int(mask.sum())}
        for metric, (xa, xb) in (("hr", (ha, hb)), ("rank", (ra, rb))):
            pa, pb = float(xa[mask].mean()), float(xb[mask].mean())
            group[metric] = {"a": summarize(pa, reps["a"][metric]), "b": summarize(pb, reps["b"][metric]),
                             "diff": paired(pa, pb, reps["a"][metric], reps["b"][metric])}
        out["groups"][name] = group
    lift, truth_high = percentile_ranks(rb - ra), percentile_ranks(-rg)
    stat = corr_stat(lift, truth_high)
    reps = replicate(Resampler(users, n_boot, seed, "hits-corr"), {"c": {"corr": stat}})["c"]["corr"]
    out["corr"] = summarize(float(stat(None, np.ones((1, len(lift))))[0]), reps)
    return out


def format_conditional_hits(c: dict) -> str:
    """One line per group and metric: rows, both values and the paired difference; then the correlation."""
    name = f"{c['a']} - {c['b']}"
    lines = [f"sequential rows ({c['n']}), split by whether {c['given']} ranks the true item first",
             f"  {'metric':<10}{'rows':<22}{'n':>5}  {c['a']:<20} {c['b']:<20} {name}"]
    for metric, label in (("hr", "hr@1"), ("rank", "mean rank")):
        for group, g in c["groups"].items():
            m = g[metric]
            star = " *" if m["diff"]["excludes_zero"] else ""
            lines.append(f"  {label:<10}{group:<22}{g['n']:>5}  {_cell(m['a']):<20} {_cell(m['b']):<20} "
                         f"{_cell(m['diff'], '+')}{star}")
    corr = c["corr"]
    star = " *" if np.isfinite(corr["lo"]) and (corr["lo"] > 0 or corr["hi"] < 0) else ""
    lines.append(f"  rank correlation of how much {c['a']} lifts the true item over {c['b']} with how high "
                 f"{c['given']} ranks it: {_cell(corr, '+')}{star}")
    return "\n".join(lines)


def format_difference(d: dict) -> str:
    """Both AUCs and the paired difference, a line each."""
    name = f"{d['a']} - {d['b']}"
    width = max(len(name), len(d["a"]), len(d["b"]))
    star = " *" if d["diff"]["excludes_zero"] else ""
    return (f"ctr auc on {d['n']} rows\n  {d['a']:<{width}} {_cell(d['auc_a'])}\n  {d['b']:<{width}} {_cell(d['auc_b'])}\n"
            f"  {name:<{width}} {_cell(d['diff'], '+')}{star} (paired)")


def format_difference_over_pairs(d: dict) -> str:
    """Each pair's two AUCs and paired difference, then the mean difference over the pairs."""
    names = [f"{p['a']} - {p['b']}" for p in d["pairs"]]
    k = len(d["pairs"])
    mean_name = f"mean of the {k} differences"
    width = max(len(x) for x in names + [mean_name] + [p[s] for p in d["pairs"] for s in ("a", "b")])
    lines = [f"ctr auc on {d['n']} rows, {k} pairs"]
    for p, name in zip(d["pairs"], names):
        star = " *" if p["diff"]["excludes_zero"] else ""
        lines += [f"  {p['a']:<{width}} {_cell(p['auc_a'])}", f"  {p['b']:<{width}} {_cell(p['auc_b'])}",
                  f"  {name:<{width}} {_cell(p['diff'], '+')}{star} (paired)"]
    star = " *" if d["mean"]["excludes_zero"] else ""
    sign = "the same sign" if d["same_sign"] else "DIFFERENT signs"
    lines.append(f"  {mean_name:<{width}} {_cell(d['mean'], '+')}{star} (paired over users; the differences have "
                 f"{sign}, spread {d['spread']:.3f})")
    return "\n".join(lines)


def format_effect(e: dict) -> str:
    """The effect's size and its correlations, a line each."""
    def cell(c, sign=""):
        return _cell(c, sign) + (" *" if np.isfinite(c["lo"]) and (c["lo"] > 0 or c["hi"] < 0) else "")

    name = f"logit({e['with']}) - logit({e['without']})"
    lines = [f"{name} on {e['n']} ctr rows",
             f"  mean {cell(e['mean'], '+')}; sd {e['sd']:.3f} (sd of logit({e['with']}): {e['sd_scores']:.3f})"]
    for k in e:
        if isinstance(e[k], dict) and k != "mean":
            lines.append(f"  rank correlation with {k:<12} {cell(e[k], '+')}")
    return "\n".join(lines)


def format_headroom(h: dict) -> str:
    """The base AUC, the stack's, the paired gain and the stack's weights, a line each."""
    g = h["gain"]
    star = " *" if g.get("excludes_zero") else ""
    stack = " + ".join([h["base"], *h["extras"]])
    width = max(len(stack), len("weights on the ranks"))
    return (f"ctr auc on {h['n']} rows, {h['folds']}-fold cross-fitted over users\n"
            f"  {h['base']:<{width}} {_cell(h['base_auc'])}\n"
            f"  {stack:<{width}} {_cell(h['stack_auc'])}\n"
            f"  {'gain (paired)':<{width}} {_cell(g, '+')}{star}\n"
            f"  {'weights on the ranks':<{width}} " + ", ".join(f"{k} {v:+.2f}" for k, v in h["weights"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckf_dist.eval.headroom",
                                     description="Could other features of the same ctr rows raise a method's AUC? "
                                                 "(cross-fitted logistic stack, paired bootstrap interval)")
    parser.add_argument("eval_dir", help="an evaluation's output folder (with rows_ctr.parquet)")
    parser.add_argument("--base", default="ckf", help="the method whose score is the base (default: ckf)")
    parser.add_argument("--add", nargs="+", default=["mf", "popularity"],
                        help="methods whose scores are added (with --effect: correlated with the effect)")
    parser.add_argument("--diff", nargs="+", metavar="A B",
                        help="instead: the AUCs of A and B and the paired difference A - B; more pairs "
                             "(A B A2 B2 ..., e.g. one pair per training seed): each pair's difference and "
                             "their mean, on the same user draws")
    parser.add_argument("--effect", nargs=2, metavar=("A", "B"),
                        help="instead: the per-row effect logit(A) - logit(B) of two scorings (e.g. ckf "
                             "ckf-slots-removed), its size and rank correlations with the label and --add")
    parser.add_argument("--given", metavar="M",
                        help="with --diff: compare on sequential rows (rows_sequential.parquet), HR@1 on all rows "
                             "and split by whether method M (e.g. mf) ranks the true item first")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    if args.given and not args.diff:
        parser.error("--given needs --diff A B")
    if args.diff and len(args.diff) % 2:
        parser.error(f"--diff takes methods in pairs (A B, or A B A2 B2 ...); got {len(args.diff)}: {args.diff}")
    if args.given and args.diff and len(args.diff) != 2:
        parser.error("--given compares one pair: --diff A B")
    task = "sequential" if args.given else "ctr"
    path = Path(args.eval_dir) / f"rows_{task}.parquet"
    if not path.is_file():
        print(f"error: {path} not found; run `ckf evaluate` (or `ckf study`) with a {task} task first", file=sys.stderr)
        return 2
    rows = pq.read_table(path).to_pydict()
    try:
        if args.given:
            print(format_conditional_hits(conditional_hits(rows, *args.diff, args.given, seed=args.seed)))
        elif args.diff and len(args.diff) > 2:
            pairs = list(zip(args.diff[::2], args.diff[1::2]))
            print(format_difference_over_pairs(difference_over_pairs(rows, pairs, seed=args.seed)))
        elif args.diff:
            print(format_difference(difference(rows, *args.diff, seed=args.seed)))
        elif args.effect:
            print(format_effect(effect(rows, *args.effect, args.add, args.seed)))
        else:
            print(format_headroom(headroom(rows, args.base, args.add, args.folds, args.seed)))
    except (KeyError, ValueError) as exc:
        print(f"error: {path}: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
