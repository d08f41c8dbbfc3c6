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
from ckf_dist.errors import CheckpointError
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


# The world-size-free copy of the optimizer (rank 0 writes it beside the ZeRO shards): fp32
# master weights and AdamW moments by parameter name, plus the step counts and the schedule.
FULL_OPTIM = "optim/full.safetensors"
FULL_OPTIM_STATE = "optim/state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero_linked(p) -> bool:
    """Whether DeepSpeed keeps ``p``'s fp32 master and moments in ZeRO partitions (stages 1-3; a
    parameter outside this rank's partition has a ``None`` mapping, and still takes part in the
    gathers)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def gathered_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], dict]:
    """The full fp32 master weights and AdamW moments of every trainable parameter (by name), and
    the JSON-able rest (AdamW step, LR schedule, engine counters): what resuming on another
    number of workers re-partitions. Collective (ZeRO gathers): every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tensors: dict[str, torch.Tensor] = {}
    inner = _inner_optimizer(engine)
    _relink_moments(engine)
    for name, p in _trainable(engine):
        if _zero_linked(p):
            tensors[f"fp32/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for key in ADAM_KEYS:
                tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
        else:                       # no ZeRO partitioning: the optimizer holds the parameter itself
            st = inner.state.get(p, {})
            tensors[f"fp32/{name}"] = p.detach().float().cpu().clone()
            for key in ADAM_KEYS:
                tensors[f"{key}/{name}"] = (st[key] if key in st else torch.zeros_like(p)).detach().float().cpu().clone()
    steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
    sched = engine.lr_scheduler
    meta = {"adam_step": max(steps) if steps else 0.0,
            "scheduler": {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"} if sched else None,
            "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples)}
    return tensors, meta


def _relink_moments(engine) -> bool:
    """Point every ZeRO-1/2 parameter fragment at its group's AdamW moments; False when this
    DeepSpeed has no way to (or there is nothing to link: ZeRO-3, or a group without moments yet).

    DeepSpeed links the fragments once, right after the first group's first optimizer step,
    when the other groups' moments do not exist yet: with two groups (LoRA and bridge) the
    bridge's fragments never see theirs. Linking again once every group has its moments fixes it.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    inner = _inner_optimizer(engine)
    if link is None or engine.zero_optimization_stage() == 3:
        return False
    flats = [t for g in inner.param_groups for t in g["params"]]
    if not flats or not all(f in inner.state for f in flats):
        return False
    engine.optimizer._hp_optimizer_states_linked = False
    link()
    return True


def _set_zero3_partition(engine, p, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's slice of the full ``value`` into ``p``'s fp32 master (``key=None``) or
    AdamW state ``key`` partition under ZeRO-3.

    (DeepSpeed's ``set_full_hp_param`` reads the slice at ``rank x partition size`` with the
    partition's own length, which runs past the end of a parameter whose size the world size
    does not divide: its last partition is padded.)
    """
    import deepspeed.comm as dist

    opt = engine.optimizer
    group, offset, numel = opt.grad_position[opt.get_param_id(p)]
    flat = opt.fp32_partitioned_groups_flat[group]
    target = (flat if key is None else opt.optimizer.state[flat][key]).detach().narrow(0, offset, numel)
    rank = dist.get_rank(group=opt._get_param_partition_group(p))
    full = value.flatten().to(target.device, target.dtype)
    start = rank * numel
    real = max(0, min(numel, full.numel() - start))
    target.zero_()
    target[:real].copy_(full[start:start + real])


class ElasticResumeError(CheckpointError):
    """A checkpoint cannot be re-partitioned for another world size."""


def load_resharded_state(engine, tensors: dict[str, torch.Tensor], meta: dict, grad_accum: int) -> None:
    """Load :func:`gathered_optimizer_state` into an engine of any world size: the weights into the
    model, the fp32 masters and moments into this rank's ZeRO partitions, the AdamW step, the LR
    schedule and DeepSpeed's step counters."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = _trainable(engine)
    missing = [n for n, _ in named if f"fp32/{n}" not in tensors]
    if missing:
        raise ElasticResumeError(f"the gathered optimizer state lacks {len(missing)} trainable tensor(s), e.g. "
                                 f"{missing[0]!r}: it was saved by another model")
    inner = _inner_optimizer(engine)
    step = torch.tensor(float(meta["adam_step"]), dtype=torch.float32)
    # A fresh engine has no AdamW state yet (torch creates it lazily at the first step): create
    # it over the flat fp32 partitions, then let ZeRO 1/2 map each parameter's fragment into it.
    zero3 = engine.zero_optimization_stage() == 3
    flats = (list(engine.optimizer.fp32_partitioned_groups_flat) if zero3
             else [t for g in inner.param_groups for t in g["params"]])
    for flat in flats:
        inner.state[flat] = {"step": step.to(flat.device).clone(),
                             **{k: torch.zeros_like(flat, dtype=torch.float32) for k in ADAM_KEYS}}
    if not zero3 and any(_zero_linked(p) for _, p in named) and not _relink_moments(engine):
        raise ElasticResumeError(f"this DeepSpeed ({deepspeed.__version__}) does not expose "
                                 f"_lazy_init_hp_params_optimizer_state: resume with the saved train.num_workers")
    for name, p in named:
        w = tensors[f"fp32/{name}"]
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(w.to(p.dtype))
            _set_zero3_partition(engine, p, w, None)
            for key in ADAM_KEYS:
                _set_zero3_partition(engine, p, tensors[f"{key}/{name}"], key)
            continue
        p.data.copy_(w.to(p.dtype))
        if _zero_linked(p):
            safe_set_full_fp32_param(p, w.to(engine.device))
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(engine.device), key)
        else:
            inner.state[p] = {"step": step.to(p.device).clone(),
                              **{k: tensors[f"{k}/{name}"].to(p.device, p.dtype).clone() for k in ADAM_KEYS}}
    sched = engine.lr_scheduler
    if sched is not None and meta.get("scheduler"):
        sched.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(sched.lr_lambdas)))
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = int(meta["global_samples"])
    engine.micro_steps = engine.global_steps * grad_accum


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
    optim, optim_meta = gathered_optimizer_state(engine)
    if rank == 0:
        (stage / "export").mkdir()
        save_file(export, str(stage / CHECKPOINT_EXPORT), metadata={"step": str(step)})
        (stage / "optim").mkdir()
        save_file(optim, str(stage / FULL_OPTIM), metadata={"step": str(step)})
        (stage / FULL_OPTIM_STATE).write_text(json.dumps(optim_meta))
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


def load_worker_checkpoint(engine, ref: store.CheckpointRef, rank: int, world_size: int, grad_accum: int = 1) -> dict:
    """Restore engine, RNG and this rank's worker state from a committed checkpoint.

    Saved by the same number of workers: DeepSpeed's own ZeRO shards, bit for bit. Saved by
    another number: the gathered optimizer state (``optim/``) re-partitioned for this world
    (:func:`load_resharded_state`) and rank 0's worker state, whose data cursor is global.
    """
    saved_world = ref.manifest.get("world_size")
    files = ref.manifest["files"]
    elastic = saved_world != world_size
    if elastic and FULL_OPTIM not in files:
        raise ElasticResumeError(
            f"{ref.url}: saved with {saved_world} workers and without a gathered optimizer state (a checkpoint of an "
            f"older version); resume it with train.num_workers={saved_world}, or start a new run_name")
    state_rank = 0 if elastic else rank
    wanted = [f"state/rank_{state_rank:05d}.json", f"state/rng_rank_{state_rank:05d}.safetensors"]
    wanted += [FULL_OPTIM, FULL_OPTIM_STATE] if elastic else [f for f in files if f.startswith("ds/")]
    local = Path(tempfile.mkdtemp(prefix=f"ckf-resume-r{rank}-"))
    try:
        store.fetch(ref, wanted, local)
        if elastic:
            load_resharded_state(engine, load_file(str(local / FULL_OPTIM)),
                                 json.loads((local / FULL_OPTIM_STATE).read_text()), grad_accum)
        else:
            engine.load_checkpoint(str(local / "ds"), tag=store.step_dir_name(ref.step), load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        state = json.loads((local / "state" / f"rank_{state_rank:05d}.json").read_text())
        rng = state.pop("rng")
        if not elastic:     # training draws its dropout from per-micro-batch seeds; restored for the rest
            set_rng_state(rng, load_file(str(local / "state" / f"rng_rank_{rank:05d}.safetensors")))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return state


def barrier() -> None:
    """A barrier when a process group exists (single-process runs have none)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
