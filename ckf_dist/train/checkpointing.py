"""Save and restore one worker's share of a training checkpoint.

Each rank writes its files into a local staging folder and hands the folder to an
*uploader* (``ray.train.report`` inside Ray, a plain fsspec upload outside it) while a
thread hashes the same files and puts its file list (sha256 and size of each file) beside
them. After every rank has done so, rank 0 commits (manifest, then marker). See
``checkpoint.store``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import random
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ckf_dist.checkpoint import store
from ckf_dist.contract import CHECKPOINT_EXPORT
from ckf_dist.storage import open_url

Uploader = Callable[[Path, str, dict], None]  # (local folder, checkpoint dir name, metrics)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python/numpy RNG states (JSON-able) and torch RNG states (tensors)."""
    py = random.getstate()
    npst = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


def gathered_trainable_state(engine, export_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Full-shaped trainable tensors on every rank (ZeRO-3 partitions are gathered first).

    Every rank must call this (the gather is collective); only rank 0 writes the result.
    """
    module = engine.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {n: p.detach().to(export_dtype).cpu().clone() for n, p in named}
    return {n: p.detach().to(export_dtype).cpu().clone() for n, p in named}


@contextlib.contextmanager
def frozen_tensors_dropped(module: torch.nn.Module):
    """While active, ``module.state_dict()`` leaves out every frozen parameter.

    DeepSpeed's ``exclude_frozen_parameters`` drops frozen names found by ``named_parameters()``,
    which lists a tied weight once: the LM head tied to the input embedding (SmolLM2, Llama-3.2,
    Qwen2 small) still went into every checkpoint (113 MB for SmolLM2-135M). This hook drops
    state-dict entries that share storage with any frozen parameter, tied aliases included.
    """
    frozen = {p.data_ptr() for _, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad and p.numel() > 0}

    def hook(_mod, state, _prefix, _meta):
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() > 0
                    and v.data_ptr() in frozen]:
            del state[key]
        return state

    handle = module._register_state_dict_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def save_worker_checkpoint(
    engine, *, step: int, rank: int, world_size: int, worker_state: dict, export_dtype: torch.dtype,
    rank0_files: dict[str, str], uploader: Uploader, metrics: dict, ckpt_url: str,
) -> Path:
    """Write this rank's files for checkpoint ``step`` and upload them; returns the staging folder.

    ``ckpt_url`` is where the uploader puts the folder (``<storage>/<run>/<step dir>``): this
    rank's file list (sha256 and size of each file) goes to ``files/rank_R.json`` there.

    ``rank0_files`` maps relative names to text contents that rank 0 adds (config, metrics log).
    """
    name = store.step_dir_name(step)
    stage = Path(tempfile.mkdtemp(prefix=f"ckf-{name}-r{rank}-"))
    # ZeRO shards for resume; the frozen backbone never goes into a checkpoint.
    with frozen_tensors_dropped(engine.module):
        engine.save_checkpoint(str(stage / "ds"), tag=name, exclude_frozen_parameters=True,
                               save_latest=(rank == 0))
    export = gathered_trainable_state(engine, export_dtype)
    if rank == 0:
        (stage / "export").mkdir()
        save_file(export, str(stage / CHECKPOINT_EXPORT), metadata={"step": str(step)})
        for rel, text in rank0_files.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
    meta, tensors = rng_state()
    (stage / "state").mkdir(exist_ok=True)
    (stage / "state" / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "rng": meta, **worker_state}))
    save_file(tensors, str(stage / "state" / f"rng_rank_{rank:05d}.safetensors"))
    # Beside the upload (both only read the staged files; hashlib releases the GIL), hash the
    # files and put this rank's file list where they go, so nothing is left to send once the
    # upload ends. The commit reads the lists only after every rank's upload has returned.
    def put_file_list() -> None:
        _lower_thread_priority()    # the upload is the critical path: hashing takes the spare cycles
        listing = store.hash_tree(stage)
        fs, path = open_url(ckpt_url)
        fs.makedirs(posixpath.join(path, "files"), exist_ok=True)
        fs.pipe_file(posixpath.join(path, "files", f"rank_{rank:05d}.json"), json.dumps(listing).encode())

    with ThreadPoolExecutor(1, thread_name_prefix="ckf-hash") as pool:
        listed = pool.submit(put_file_list)
        uploader(stage, name, metrics)
        listed.result()
    return stage


def _lower_thread_priority() -> None:
    """Nice the calling thread to 19 where the OS allows it (Linux: a thread is a task with its own
    nice value); elsewhere, or without permission, leave it as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def load_worker_checkpoint(engine, ref: store.CheckpointRef, rank: int, world_size: int) -> dict:
    """Restore engine, RNG and this rank's worker state from a committed checkpoint."""
    saved_world = ref.manifest.get("world_size")
    if saved_world != world_size:
        raise store.CheckpointError(
            f"{ref.url}: saved with {saved_world} workers, resuming with {world_size}; exact resume needs the same "
            f"train.num_workers (or start a new run_name)")
    files = ref.manifest["files"]
    wanted = [f for f in files if f.startswith("ds/")]
    wanted += [f"state/rank_{rank:05d}.json", f"state/rng_rank_{rank:05d}.safetensors"]
    local = Path(tempfile.mkdtemp(prefix=f"ckf-resume-r{rank}-"))
    try:
        store.fetch(ref, wanted, local)
        engine.load_checkpoint(str(local / "ds"), tag=store.step_dir_name(ref.step), load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        state = json.loads((local / "state" / f"rank_{rank:05d}.json").read_text())
        set_rng_state(state.pop("rng"), load_file(str(local / "state" / f"rng_rank_{rank:05d}.safetensors")))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return state


def barrier() -> None:
    """A barrier when a process group exists (single-process runs have none)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
