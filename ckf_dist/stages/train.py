"""``ckf train``: the Ray Train driver.

Connects to a Ray cluster (``train.address``) or starts a local one sized so that workers
cannot starve each other, then runs a ``TorchTrainer`` whose workers execute
:func:`ckf_dist.train.worker.train_loop_per_worker`. Checkpoints land under
``<train.storage>/<run_name>/step_XXXXXXXX``; rerunning the same run name resumes.
"""

from __future__ import annotations

import dataclasses
import os

from ckf_dist.checkpoint import store
from ckf_dist.config import CKFConfig, config_to_dict
from ckf_dist.train.deepspeed_config import TrainError
from ckf_dist.storage import guarded, is_local, open_url, pyarrow_filesystem


def _init_ray(cfg: CKFConfig):
    """Start or join Ray; returns a :class:`ckf_dist.reaper.Reaper` when this call started a local
    cluster (shut it down, then call ``done()``), else None."""
    import ray

    from ckf_dist import reaper

    if ray.is_initialized():
        return None
    tcfg = cfg.train
    env = {k: os.environ[k] for k in tcfg.forward_env if k in os.environ}
    env.update(QUIET_WORKERS)
    if tcfg.address:
        ray.init(address=tcfg.address, runtime_env={"env_vars": env, **WORKER_SETUP}, log_to_driver=True)
    else:
        # One logical CPU per worker plus headroom: Ray tasks beside the workers must never
        # wait on a CPU the workers hold (Ray waits forever when every CPU is held: the 1/0 CPU deadlock).
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls
        # (without it, it warns every few seconds); loopback only.
        # The reaper stops this cluster's processes if the driver dies without shutting it down.
        guard = reaper.start()
        try:
            ray.init(num_cpus=max(4, tcfg.num_workers + 2), include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=_free_port(), log_to_driver=True,
                     runtime_env={"env_vars": QUIET_WORKERS, **WORKER_SETUP})
        except BaseException:
            guard.done()
            raise
        return guard
    return None


# Ray Train re-routes print() of workers through its logger, which doubles every progress
# line on the driver; our workers print plain lines.
QUIET_WORKERS = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def pin_ray_address() -> None:
    """Run in every Ray worker process of our jobs: name this cluster in ``RAY_ADDRESS``.

    Ray Train's helpers (its placement-group cleaner) look their cluster up through the state
    API with no address; with a second Ray cluster on the machine (two runs on one workstation)
    that lookup fails with "Found multiple active Ray instances" and a traceback on the console."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


WORKER_SETUP = {"worker_process_setup_hook": "ckf_dist.stages.train.pin_ray_address"}

# Driver-side switches handed to every worker (fault injection, sample log: tests and audits)
WORKER_ENV = ("CKF_FAULT", "CKF_SAMPLE_LOG")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def absolute_paths(cfg: CKFConfig) -> CKFConfig:
    """Ray workers run in their own working directory: turn the config's local paths absolute."""
    import dataclasses

    def fix(url: str) -> str:
        return os.path.abspath(os.path.expanduser(url)) if url and is_local(url) else url

    backbone = cfg.model.backbone
    if backbone and is_local(backbone) and os.path.exists(os.path.expanduser(backbone)):
        backbone = fix(backbone)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, output=fix(cfg.data.output)),
        model=dataclasses.replace(cfg.model, backbone=backbone, cache_dir=fix(cfg.model.cache_dir)),
        train=dataclasses.replace(cfg.train, storage=fix(cfg.train.storage), log_dir=fix(cfg.train.log_dir)),
        eval=dataclasses.replace(cfg.eval, output=fix(cfg.eval.output)),
    )


def _check_inputs(cfg: CKFConfig) -> None:
    """Fail before starting workers when the dataset or storage is unusable (each a one-line error)."""
    from ckf_dist.data.shards import read_dataset_manifest
    from ckf_dist.data.stream import check_tokenizer
    from ckf_dist.model.backbone import preflight_backbone

    manifest, _, _ = read_dataset_manifest(cfg.data.output)       # complete, readable, this schema
    check_tokenizer(manifest, preflight_backbone(cfg.model))    # backbone folder, family, tokenizer vs dataset
    sfs, spath = open_url(cfg.train.storage)
    probe = f"{spath}/{cfg.run_name}/.ckf-write-probe-{os.getpid()}"
    with guarded(f"train.storage {cfg.train.storage} (not writable?)"):
        sfs.makedirs(f"{spath}/{cfg.run_name}", exist_ok=True)
        sfs.pipe_file(probe, b"ok")             # object stores create nothing on makedirs: write for real
        sfs.rm_file(probe)


def worker_failure(exc: BaseException) -> tuple[int | None, BaseException]:
    """``(rank, exception)`` a worker raised, out of Ray's wrappers (WorkerGroupError, ControllerError,
    RayTaskError, ``raise ... from`` chains); rank is None when no per-rank failure is attached."""
    rank, seen = None, set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)              # ray.train.WorkerGroupError
        if failures:
            if rank is None:
                rank = min(failures)
            exc = failures[min(failures)]
            continue
        inner = getattr(exc, "controller_failure", None) or getattr(exc, "cause", None)   # ControllerError, RayTaskError
        if isinstance(inner, BaseException):
            exc = inner
            continue
        if exc.__cause__ is not None:
            exc = exc.__cause__
            continue
        break
    return rank, exc


def failure_message(exc: BaseException) -> str:
    """One line for a failed run: the worker's own error (rank and message), not Ray's wrapper."""
    from ckf_dist.errors import CKFError

    rank, cause = worker_failure(exc)
    text = " ".join(str(cause).split())
    if not isinstance(cause, CKFError):
        text = f"{type(cause).__name__}: {text}"
    if len(text) > 600:
        text = text[:600] + " ..."
    return (f"rank {rank}: " if rank is not None else "") + text


def _log_hint(cfg: CKFConfig, rank: int | None) -> str:
    """Where the failing worker's traceback and the full worker logs are, as a suffix."""
    from ckf_dist.train.worker import error_file

    try:
        import ray

        node = ray._private.worker.global_worker.node        # private, but the only way to the session path
        logs = node.get_logs_dir_path() if node is not None else ""
    except Exception:  # noqa: BLE001 - a hint only
        logs = ""
    where = []
    if rank is not None:
        where.append(f"traceback: {error_file(cfg, rank)} on rank {rank}'s node")
    if logs:
        where.append(f"full worker logs: {logs}/worker-*.err")
    return f" ({'; '.join(where)})" if where else ""


def run_train(cfg: CKFConfig, progress: bool = True) -> dict:
    """Train with ``cfg.train.num_workers`` Ray workers; returns the committed checkpoint URL.

    The driver checks its inputs, then holds a lease on ``<train.storage>/<run_name>`` for the
    whole run (a second ``ckf train`` of the run is refused, naming the holder) and refuses a
    resume under a config that differs from the checkpoint's (:func:`check_resume`)."""
    from ckf_dist.lease import Lease

    cfg = absolute_paths(cfg)
    _check_inputs(cfg)
    with Lease(f"{cfg.train.storage.rstrip('/')}/{cfg.run_name}", "ckf train") as lease:
        cfg = check_resume(cfg)
        result = _fit(cfg)
        lease.check()
    return result


def check_resume(cfg: CKFConfig) -> CKFConfig:
    """Refuse to resume a run under a config that differs from its checkpoint's where it matters;
    returns the config to run (``grad_accum`` adapted when only the number of workers changed).

    The saved engine, scheduler and data cursor win on resume, so a changed learning rate or
    batch would be silently ignored; a changed model or dataset would not even load. Fields that
    are safe to change (how long, how often to save or log, where to reach the cluster) pass.
    The number of workers may change when the global batch (micro_batch_size x grad_accum x
    num_workers) stays: a changed ``num_workers`` alone gets the ``grad_accum`` that keeps it.
    """
    from ckf_dist.config import config_from_dict

    ref = store.latest_committed(cfg.train.storage, cfg.run_name)
    if ref is None or "config" not in ref.manifest:
        return cfg
    saved_cfg = config_from_dict(ref.manifest["config"], f"{ref.url}/manifest.json")
    cfg = _keep_global_batch(cfg, saved_cfg.train, ref)
    saved = config_to_dict(saved_cfg)
    diffs = [f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(saved, config_to_dict(cfg))
             if not key.startswith(RESUME_FREE) and key not in BATCH_SPLIT]
    if diffs:
        raise TrainError(f"run {cfg.run_name!r} resumes from {ref.url}, whose config differs in "
                         f"{len(diffs)} field(s) that the resume cannot honour: {'; '.join(diffs[:6])}"
                         f"{' ...' if len(diffs) > 6 else ''}; use the checkpoint's values or a new run_name")
    return cfg


# How a global batch is split (rows per micro-batch, micro-batches per step, workers): free on
# resume as long as their product, the global batch, stays.
BATCH_SPLIT = ("train.micro_batch_size", "train.grad_accum", "train.num_workers")


def _keep_global_batch(cfg: CKFConfig, saved, ref) -> CKFConfig:
    t = cfg.train
    want = saved.global_batch
    if t.global_batch == want:
        return cfg
    if (t.micro_batch_size, t.grad_accum) == (saved.micro_batch_size, saved.grad_accum):   # only the workers changed
        try:
            kept = saved.on_workers(t.num_workers)
        except ValueError:
            pass
        else:
            print(f"[ckf] resuming a {saved.num_workers}-worker run on {t.num_workers}: grad_accum {t.grad_accum} -> "
                  f"{kept.grad_accum} keeps the global batch of {want} rows", flush=True)
            return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=kept.grad_accum))
    raise TrainError(
        f"run {cfg.run_name!r} resumes from {ref.url}, whose global batch is {want} rows "
        f"({saved.micro_batch_size} x grad_accum {saved.grad_accum} x {saved.num_workers} workers); this config has "
        f"{t.global_batch} ({t.micro_batch_size} x {t.grad_accum} x {t.num_workers}); choose micro_batch_size x "
        f"grad_accum x num_workers = {want}, or a new run_name")


# Config fields a resumed run may change: its length, saving, logging, cluster and evaluation settings.
RESUME_FREE = ("run_name", "train.min_workers", "train.worker_resources", "train.max_steps", "train.save_every",
               "train.num_to_keep", "train.log_every", "train.log_dir", "train.address", "train.forward_env", "train.max_failures", "train.storage",
               "train.group_norms", "data.output", "data.engine", "data.ray_workers", "data.ray_address",
               "model.cache_dir", "model.backbone_id", "eval.", "study.")


def _differences(a: dict, b: dict, prefix: str = ""):
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(left, dict) and isinstance(right, dict):
            yield from _differences(left, right, name + ".")
        elif left != right:
            yield name, left, right


def _fit(cfg: CKFConfig) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ckf_dist.train.worker import train_loop_per_worker

    tcfg = cfg.train
    guard = _init_ray(cfg)
    try:
        pa_fs, storage_path = pyarrow_filesystem(tcfg.storage)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": config_to_dict(cfg), "env": {k: os.environ[k] for k in WORKER_ENV if k in os.environ}},
            # elastic (train.min_workers): Ray Train starts on what it gets in the range and
            # restarts the group on the workers left after a loss; each size resumes exactly
            scaling_config=ScalingConfig(
                num_workers=(tcfg.min_workers, tcfg.num_workers) if tcfg.min_workers else tcfg.num_workers,
                use_gpu=tcfg.use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if tcfg.use_gpu else {}), **tcfg.worker_resources}),
            torch_config=TorchConfig(backend="nccl" if tcfg.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.run_name, storage_path=storage_path, storage_filesystem=pa_fs,
                failure_config=FailureConfig(max_failures=tcfg.max_failures),
                # Retention is ours (checkpoint.store.apply_retention): it only deletes after a newer commit.
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                # Ray Train's INFO lines (worker-group start, the failure policy's decision with
                # the worker's traceback again) stay in its session log files; warnings and the
                # worker's error still reach the console, and the driver ends with one line
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:
            raise TrainError(f"training run {cfg.run_name!r} failed: {failure_message(exc)}"
                             f"{_log_hint(cfg, worker_failure(exc)[0])}") from exc
    finally:
        if guard is not None:
            ray.shutdown()
            guard.done()
    ref = store.latest_committed(tcfg.storage, cfg.run_name)
    if ref is None:
        raise TrainError(f"run {cfg.run_name!r} finished without a committed checkpoint in {tcfg.storage}")
    return {"checkpoint": ref.url, "step": ref.step, "metrics": ref.manifest.get("metrics", {})}
