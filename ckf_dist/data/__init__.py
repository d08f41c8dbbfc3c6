"""ckf_dist.data: sources -> protocol (split) -> prompts -> shards (+ manifest) -> streaming reader, collate.

Main entry points (imported lazily, so ``import ckf_dist.data.config`` stays cheap):
``run_prepare`` (prepare.py), ``ShardStream`` and ``check_tokenizer`` (stream.py),
``collate`` (collate.py), ``read_dataset_manifest``/``load_cf_tables``/``load_items`` (shards.py),
``DataError`` (errors.py).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "errors", "run_prepare": "prepare", "ShardStream": "stream", "check_tokenizer": "stream",
    "collate": "collate", "read_dataset_manifest": "shards", "load_cf_tables": "shards", "load_items": "shards",
    "load_interactions_table": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ckf_dist.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ckf_dist.data' has no attribute {name!r}")
