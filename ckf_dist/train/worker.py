"""The per-worker training loop: build the CKF model, wrap its trainable part in DeepSpeed,
stream this rank's shard rows, run the two-stream curriculum step, checkpoint, resume.

Runs inside a Ray Train worker (``train_loop_per_worker``) or in a plain process with a
world of one (``run_worker`` with a local uploader), which is what the fast tests use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

from ckf_dist.checkpoint import store
from ckf_dist.contract import IGNORE_INDEX, N_TASKS, STREAMS
from ckf_dist.data import shards
from ckf_dist.config import CKFConfig, config_to_dict, dump_config
from ckf_dist.train.checkpointing import barrier, load_worker_checkpoint, save_worker_checkpoint
from ckf_dist.train.deepspeed_config import build_deepspeed_config
from ckf_dist.train.metrics_log import MetricsLog
from ckf_dist.train.schedule import group_lr_lambda, mask_answer_eos, micro_seed, param_groups
from ckf_dist.storage import open_url

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    """Same initial weights and dropout masks on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_fault(spec: str) -> dict:
    """Test fault injection from ``CKF_FAULT``: ``raise@STEP`` or ``kill@STEP:rank=R:once=PATH``."""
    if not spec:
        return {}
    head, *opts = spec.split(":")
    kind, _, step = head.partition("@")
    fault = {"kind": kind, "step": int(step)}
    for o in opts:
        k, _, v = o.partition("=")
        fault[k] = v
    return fault


class Worker:
    """One rank of a CKF training run."""

    def __init__(self, cfg: CKFConfig, rank: int, world_size: int, uploader, fault: str = ""):
        if world_size != cfg.train.num_workers:
            # an elastic run (train.min_workers) on fewer or more workers than num_workers: the
            # same global batch, as grad_accum micro-batches per worker
            most = cfg.train.num_workers
            cfg = dataclasses.replace(cfg, train=cfg.train.on_workers(world_size))
            if rank == 0:
                print(f"[ckf] running on {world_size} of up to {most} workers: grad_accum "
                      f"{cfg.train.grad_accum} keeps the global batch of {cfg.train.global_batch} rows", flush=True)
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.uploader = uploader
        self.fault = parse_fault(fault)
        # CKF_SAMPLE_LOG=DIR: every rank appends the sample ids of each micro-batch (tests, audits)
        log_dir = os.environ.get("CKF_SAMPLE_LOG", "")
        self.sample_log = os.path.join(log_dir, f"samples_rank{rank}.jsonl") if log_dir else ""
        self.step = 0
        self.log = MetricsLog(cfg, rank)
        self._retention: threading.Thread | None = None

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Data stream, CKF model and DeepSpeed engine, in that order."""
        import deepspeed

        from ckf_dist.data import check_tokenizer, load_cf_tables, read_dataset_manifest
        from ckf_dist.data.stream import ShardStream
        from ckf_dist.model import build_ckf_model, load_backbone

        cfg, tcfg = self.cfg, self.cfg.train
        # DeepSpeed's comm layer joins the process group Ray Train set up (zero.Init needs it early)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() and tcfg.use_gpu else "gloo")
        self.manifest, _, _ = read_dataset_manifest(cfg.data.output)
        # every rank takes its micro_batch_size x grad_accum rows of each global batch of one order
        self.stream = ShardStream(cfg.data.output, split="train", rank=self.rank, world_size=self.world,
                                  seed=cfg.seed, shuffle_buffer=tcfg.shuffle_buffer, prefetch=tcfg.prefetch_shards,
                                  rank_batch=tcfg.micro_batch_size * tcfg.grad_accum)
        seed_everything(cfg.seed)
        # ZeRO-3: the frozen backbone is partitioned as it loads (no rank holds all of it), so its
        # DeepSpeed config comes first; otherwise every rank holds a full frozen copy, and the
        # config waits for the trainable count (ZeRO-1/2 size their gradient buckets to it).
        zero3 = tcfg.zero_stage == 3
        self.ds_config = build_deepspeed_config(tcfg, self.world, cfg.model.dtype) if zero3 else None
        backbone, tokenizer = load_backbone(cfg.model, zero3_config=self.ds_config)
        check_tokenizer(self.manifest, tokenizer)
        # recorded in the manifest: the backbone was partitioned before any rank held all of it
        self.partitioned_at_load = any(hasattr(p, "ds_id") for p in backbone.parameters())
        self.pad_id = int(self.manifest["tokenizer"]["pad_id"])
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        cf = load_cf_tables(cfg.data.output, manifest=self.manifest)
        model = build_ckf_model(cfg.model, backbone, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]),
                                n_tasks=N_TASKS, seed=cfg.seed)
        # from_pretrained hands the backbone over in eval mode, where transformers skips gradient
        # checkpointing (and any dropout): training runs the whole model in train mode
        model.train()
        self.total_steps = self._total_steps()
        self.groups = param_groups(model)
        params = [p for ps in self.groups.values() for p in ps]
        if not zero3:
            self.ds_config = build_deepspeed_config(tcfg, self.world, cfg.model.dtype,
                                                    n_trainable=sum(p.numel() for p in params))
        # fused: one kernel per step over the (ZeRO-flattened) fp32 partition instead of ~10
        # elementwise passes; torch has it on CPU and CUDA (docs/performance.md, "fused AdamW")
        lrs = {"lora": tcfg.lr, "bridge": tcfg.lr_bridge or tcfg.lr}
        opt = torch.optim.AdamW([{"params": ps, "lr": lrs[g], "name": g} for g, ps in self.groups.items()],
                                lr=tcfg.lr, eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay, fused=True)
        self._adamw = opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [group_lr_lambda(g, self.total_steps, tcfg)
                                                        for g in self.groups])
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=self.ds_config, model_parameters=params)
        self.device = self.engine.device

    def _total_steps(self) -> int:
        t = self.cfg.train
        steps_per_epoch = self.stream.batches_per_epoch      # the stream refuses a split smaller than one step
        total = math.ceil(t.epochs * steps_per_epoch) if t.epochs > 0 else t.max_steps
        return min(total, t.max_steps) if t.max_steps > 0 else total

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Restore from the newest committed checkpoint of this run, if any."""
        ref = store.latest_committed(self.cfg.train.storage, self.cfg.run_name)
        if ref is None:
            return False
        state = load_worker_checkpoint(self.engine, ref, self.rank, self.world, self.cfg.train.grad_accum)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["cursor"])
        self.log.restore(ref)
        if self.rank == 0:
            saved = ref.manifest.get("world_size")
            how = f" (saved by {saved} workers, resharded for {self.world})" if saved != self.world else ""
            print(f"[ckf] resumed from {ref.url} at step {self.step}/{self.total_steps}{how}", flush=True)
        return True

    # ------------------------------------------------------------------ loop
    def batches(self):
        """Micro-batches of this rank's rows, epoch after epoch: consecutive ``micro_batch_size`` rows
        of its slice of each global batch (the stream ends every epoch on a global batch)."""
        from ckf_dist.data.collate import collate

        mb = self.cfg.train.micro_batch_size
        while True:          # each pass over the stream is the rest of its current epoch
            rows = []
            for row in self.stream:
                rows.append(row)
                if len(rows) == mb:
                    yield collate(rows, self.pad_id)
                    rows = []

    def steps(self):
        """The ``grad_accum`` micro-batches of each optimizer step, as lists."""
        accum, group = self.cfg.train.grad_accum, []
        for batch in self.batches():
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []

    def global_means(self, acc: dict[str, float]) -> dict[str, float]:
        """The headline losses averaged over ranks (per-task losses stay this rank's)."""
        keys = [k for k in ("loss", "loss_text", "loss_cf") if k in acc]
        if self.world == 1 or not keys:
            return {}
        import torch.distributed as dist

        t = torch.tensor([acc[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def group_grad_norms(self, stats: dict) -> dict[str, list]:
        """Per-group gradient norms into ``stats``; returns the groups' parameters before the update.

        After the boundary micro-batch's backward, before the step (ZeRO 1/2 assemble each
        full gradient from the partitions: every rank calls this at the same steps).
        """
        from deepspeed.utils import safe_get_full_grad

        before = {}
        for g, ps in self.groups.items():
            if any(hasattr(p, "ds_id") for p in ps):       # ZeRO-3: partitioned, not logged
                continue
            sq = 0.0
            for p in ps:
                grad = safe_get_full_grad(p)
                if grad is not None:
                    sq += float(grad.detach().float().square().sum())
            stats[f"grad_norm/{g}"] = sq ** 0.5
            before[g] = [p.detach().float().clone() for p in ps]
        return before

    def group_update_norms(self, stats: dict, before: dict[str, list]) -> None:
        """The norm of each group's parameter change in the step just taken."""
        for g, old in before.items():
            sq = sum(float((p.detach().float() - o).square().sum()) for p, o in zip(self.groups[g], old))
            stats[f"update_norm/{g}"] = sq ** 0.5

    def step_denominators(self, micro_batches: list[dict]) -> dict[str, float]:
        """Per-stream divisors that make the step's gradient the mean over every answer token of
        the global batch (``train.loss_norm: sample``: over its rows with an answer), whatever the
        split into ranks and micro-batches: DeepSpeed divides by grad_accum and averages over the
        ranks, so each micro-batch divides its sum by count / (world_size * grad_accum)."""
        def count(batch, s):
            answer = batch[f"{s}_labels"][:, 1:] != IGNORE_INDEX
            return float(answer.any(1).sum() if self.cfg.train.loss_norm == "sample" else answer.sum())

        counts = torch.tensor([sum(count(b, s) for b in micro_batches) for s in STREAMS], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(counts)
        parts = self.world * len(micro_batches)
        return {s: max(float(c), 1.0) / parts for s, c in zip(STREAMS, counts.tolist())}

    def train_step(self, micro_batches: list[dict]) -> tuple[dict[str, float], int, int]:
        """One optimizer step over this rank's ``grad_accum`` micro-batches: ``(stats averaged over
        them, rows, tokens)``. ``self.step`` is the step being taken (not advanced here)."""
        tcfg, engine = self.cfg.train, self.engine
        acc: dict[str, float] = {}
        seen = tokens = 0
        if not tcfg.loss_eos:
            micro_batches = [mask_answer_eos(b, self.eos_id) for b in micro_batches]
        denoms = self.step_denominators(micro_batches)
        for micro, batch in enumerate(micro_batches):
            if self.sample_log:
                with open(self.sample_log, "a") as fh:
                    fh.write(dump_json({"step": self.step, "micro": micro, "rank": self.rank, "world": self.world,
                                        "t": time.time(), "sample_ids": batch["sample_ids"].tolist()}) + "\n")
            # dropout masks follow the micro-batch's place in the global batch, not the rank
            torch.manual_seed(micro_seed(self.cfg.seed, self.step, self.rank * tcfg.grad_accum + micro))
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            # through the engine, not engine.module: ZeRO-3 counts the step's micro-batches in its
            # forward, and without that count each micro-batch's gradient replaced the last one's
            loss, stats = engine(batch=batch, step=self.step, total_steps=self.total_steps, mode=tcfg.mode,
                                 denoms=denoms, curriculum=tcfg.curriculum, norm=tcfg.loss_norm)
            bridge = engine.module.bridge
            if bridge is not None and batch["slot_row"].numel():    # injected-token scale vs real tokens
                stats.update(bridge.token_norms(batch["history"], batch["slot_row"], batch["slot_kind"],
                                                batch["slot_cf_id"]))
            engine.backward(loss)
            boundary = micro + 1 == tcfg.grad_accum
            watch = boundary and tcfg.group_norms and (self.step + 1) % max(1, tcfg.log_every) == 0
            norms: dict[str, float] = {}     # not averaged over micro-batches: one value per step
            before = self.group_grad_norms(norms) if watch else None
            engine.step()          # DeepSpeed applies the update on the last micro-batch of the step
            if before is not None:
                self.group_update_norms(norms, before)
            seen += int(batch["task_ids"].numel())
            tokens += int(batch["text_attention_mask"].sum() + batch["cf_attention_mask"].sum())
            for k, v in stats.items():
                acc[k] = acc.get(k, 0.0) + float(v) / tcfg.grad_accum
            acc.update(norms)
        return acc, seen, tokens

    def train(self) -> dict:
        """Run until ``total_steps`` optimizer steps; checkpoint every ``save_every`` and at the end."""
        tcfg = self.cfg.train
        engine = self.engine
        t0 = time.perf_counter()
        for micro_batches in self.steps():
            if self.step >= self.total_steps:
                break
            acc, seen, tokens = self.train_step(micro_batches)
            self.step += 1
            acc.update(self.global_means(acc))
            dt = time.perf_counter() - t0
            lr_now = engine.get_lr()
            if len(lr_now) > 1:
                acc["lr_bridge"] = lr_now[1]
            self.log.step(self.step, self.total_steps, acc, lr=lr_now[0],
                          samples_per_s=seen * self.world / dt, tokens_per_s=tokens * self.world / dt)
            t0 = time.perf_counter()
            if self.step % tcfg.save_every == 0 or self.step == self.total_steps:
                self.save()
            self._maybe_fault()
        self.join_retention()
        self.log.close()
        return {"step": self.step}

    # ------------------------------------------------------------------ save
    def save(self) -> None:
        """Every rank writes and uploads its share; rank 0 commits after all have uploaded."""
        import deepspeed
        import transformers

        worker_state = {"step": self.step, "cursor": self.stream.state_dict(), "world_size": self.world}
        rank0_files = {"config.yaml": dump_config(self.cfg), "metrics.jsonl": self.log.jsonl_text()}
        ckpt_url = f"{self.cfg.train.storage.rstrip('/')}/{self.cfg.run_name}/{store.step_dir_name(self.step)}"
        stage = save_worker_checkpoint(
            self.engine, step=self.step, rank=self.rank, world_size=self.world, worker_state=worker_state,
            export_dtype=DTYPES[self.cfg.train.export_dtype], rank0_files=rank0_files,
            uploader=self.uploader, metrics=self.log.last, ckpt_url=ckpt_url)
        barrier()  # every rank's files are in storage before the marker
        if self.rank == 0:
            fs, path = open_url(ckpt_url)
            manifest = {
                "step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                "run_name": self.cfg.run_name, "config": config_to_dict(self.cfg),
                "dataset": {"url": self.cfg.data.output, "tokenizer": self.manifest["tokenizer"],
                            "answer_tokens": self.manifest.get("answer_tokens", {}),
                            "fingerprint": shards.dataset_fingerprint(self.manifest)},
                "zero_stage": self.engine.zero_optimization_stage(),
                "backbone_partitioned_at_load": self.partitioned_at_load, "export_dtype": self.cfg.train.export_dtype,
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                             "transformers": transformers.__version__},
                "metrics": self.log.last,
            }
            self.join_retention()
            store.commit(fs, path, manifest, self.world)
            # Deleting older checkpoints never blocks training: it runs beside the next steps,
            # and the next commit (or the end of the run) waits for it.
            self._retention = threading.Thread(target=self._apply_retention, name="ckf-retention")
            self._retention.start()
            print(f"[ckf] checkpoint committed: step {self.step} -> {path}", flush=True)
        barrier()
        shutil.rmtree(stage, ignore_errors=True)

    def _apply_retention(self) -> None:
        try:
            store.apply_retention(self.cfg.train.storage, self.cfg.run_name, self.cfg.train.num_to_keep)
        except Exception as e:  # an old checkpoint left behind is not worth failing a run for
            warnings.warn(f"checkpoint retention failed (older checkpoints kept): {type(e).__name__}: {e}",
                          stacklevel=1)

    def join_retention(self) -> None:
        """Wait for the previous save's retention, if it is still deleting."""
        if self._retention is not None:
            self._retention.join()
            self._retention = None

    def _maybe_fault(self) -> None:
        f = self.fault
        if not f or f["step"] != self.step:
            return
        if f["kind"] == "raise":
            raise RuntimeError(f"injected fault after step {self.step} (CKF_FAULT)")
        if f["kind"] == "kill" and int(f.get("rank", self.rank)) == self.rank:
            once = f.get("once")
            if once and os.path.exists(once):
                return
            if once:
                Path(once).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


def run_worker(cfg: CKFConfig, rank: int, world_size: int, uploader, fault: str = "") -> dict:
    """Build, resume if possible, train. The body of every worker."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
    worker = Worker(cfg, rank, world_size, uploader, fault)
    worker.build()
    worker.resume()
    return worker.train()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the resolved config dict and the fault spec."""
    import ray.train

    from ckf_dist.config import config_from_dict

    import logging

    os.environ.update(config.get("env", {}))
    # Ray Train logs every report's metrics dict at INFO (module-path loggers under the root)
    logging.getLogger().setLevel(logging.WARNING)
    cfg = config_from_dict(config["cfg"], source="train_loop_config")
    ctx = ray.train.get_context()

    def ray_uploader(folder: Path, name: str, metrics: dict) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=name)   # synchronous: the staged folder stays (hashed meanwhile)

    rank = ctx.get_world_rank()
    traceback_to_file(error_file(cfg, rank), run_worker, cfg, rank, ctx.get_world_size(), ray_uploader,
                      os.environ.get("CKF_FAULT", ""))


def traceback_to_file(path: Path, fn, *args):
    """``fn(*args)``; an exception it raises has its whole traceback written to ``path`` and goes
    on without its frames and chained causes (same type and message).

    Ray prints a failed worker's traceback once from the worker and again from its controller;
    stripped, the console shows a few lines and the driver's one-line error names ``path``.
    When ``path`` cannot be written the exception goes on whole."""
    try:
        return fn(*args)
    except Exception as exc:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(traceback.format_exception(exc)))
        except OSError:
            raise exc from None
        exc.__cause__, exc.__context__, exc.__suppress_context__ = None, None, True
        raise exc.with_traceback(None) from None


def error_file(cfg: CKFConfig, rank: int) -> Path:
    """Where a failed worker writes its whole traceback (on its own node, beside the run's logs)."""
    return Path(cfg.train.log_dir) / cfg.run_name / f"error_rank{rank}.txt"


def local_uploader(cfg: CKFConfig):
    """Uploader for a single process without Ray: copy the staging folder into storage."""
    fs, root = open_url(cfg.train.storage)

    def upload(folder: Path, name: str, metrics: dict) -> None:
        dest = f"{root}/{cfg.run_name}/{name}"
        fs.makedirs(dest, exist_ok=True)
        fs.put(str(folder) + "/", dest, recursive=True)

    return upload


def dump_json(obj) -> str:
    """Compact JSON used in logs."""
    return json.dumps(obj, separators=(",", ":"))
