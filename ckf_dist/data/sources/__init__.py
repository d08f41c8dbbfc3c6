"""Readers that turn a raw recommendation log into one normalized :class:`Interactions` table.

``load_interactions(cfg, seed)`` dispatches on ``data.source``:
movielens-embedded (default, from the recbole wheel), movielens-100k, movielens-1m,
amazon2014, amazon2018, yelp, synthetic (generated into ``data.path`` or a temp folder).
"""

from __future__ import annotations

import shutil
import tempfile

from fsspec.core import url_to_fs

from ckf_dist.data.config import DataConfig
from ckf_dist.data.errors import BadRecords
from ckf_dist.data.sources.base import Interactions, iter_lines, reading_progress
from ckf_dist.data.sources.jsonlines import parse_record, read_amazon, read_yelp
from ckf_dist.data.sources.movielens import read_movielens_embedded, read_movielens_raw
from ckf_dist.data.sources.synthetic import REVIEWS_FILE, write_synthetic

__all__ = ["Interactions", "load_interactions", "iter_lines", "parse_record", "read_amazon", "read_yelp",
           "read_movielens_embedded", "read_movielens_raw", "write_synthetic"]


def load_interactions(cfg: DataConfig, seed: int = 0, progress: bool = False) -> Interactions:
    """Read the configured source into the normalized table (bad records per ``cfg.bad_records``);
    ``progress``: a line every 500k records."""
    with reading_progress(progress):
        return _load(cfg, seed)


def _load(cfg: DataConfig, seed: int) -> Interactions:
    bad = BadRecords(cfg.bad_records)
    src = cfg.source
    if src == "movielens-embedded":
        from ckf_dist.resources import movielens_100k_dir

        return read_movielens_embedded(str(movielens_100k_dir()), bad)
    if src == "movielens-100k":
        return read_movielens_raw(cfg.path, bad, "100k")
    if src == "movielens-1m":
        return read_movielens_raw(cfg.path, bad, "1m")
    if src == "amazon2014":
        return read_amazon(cfg.path, cfg.meta_path, bad, 2014, cfg.engine)
    if src == "amazon2018":
        return read_amazon(cfg.path, cfg.meta_path, bad, 2018, cfg.engine)
    if src == "yelp":
        return read_yelp(cfg.path, cfg.meta_path, bad, cfg.engine)
    if src == "synthetic":
        return _synthetic(cfg, seed, bad)
    raise ValueError(f"data.source: unknown source {src!r}")


def _synthetic(cfg: DataConfig, seed: int, bad: BadRecords) -> Interactions:
    args = dict(n_users=cfg.synthetic_users, n_items=cfg.synthetic_items, per_user=cfg.synthetic_interactions_per_user, seed=seed)
    if cfg.path:
        fs, p = url_to_fs(cfg.path)
        if not fs.exists(f"{p.rstrip('/')}/{REVIEWS_FILE}"):
            fs.makedirs(p, exist_ok=True)
            write_synthetic(cfg.path, **args)
        table = read_amazon(cfg.path, "", bad, 2018, cfg.engine)
    else:
        folder = tempfile.mkdtemp(prefix="ckf-synthetic-")
        try:
            write_synthetic(folder, **args)
            table = read_amazon(folder, "", bad, 2018, cfg.engine)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    table.source = "synthetic"
    return table
