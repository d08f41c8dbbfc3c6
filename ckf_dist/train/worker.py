"""The per-worker training loop: build the CKF model, wrap its trainable part in DeepSpeed,
stream this rank's shard rows, run the two-stream curriculum step, checkpoint, resume.

Runs inside a Ray Train worker (``train_loop_per_worker``) or in a plain process with a
world of one (``run_worker`` with a local uploader), which is what the fast tests use.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ckf_dist.checkpoint import store
from ckf_dist.contract import IGNORE_INDEX, N_TASKS, STREAMS
from ckf_dist.data import shards
from ckf_dist.config import CKFConfig, config_to_dict, dump_config
from ckf_dist.train.checkpointing import barrier, load_worker_checkpoint, save_worker_checkpoint
from ckf_dist.train.deepspeed_config import TrainError, build_deepspeed_config
from ckf_dist.train.metrics_log import MetricsLog
from ckf_dist.storage import open_url

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    """Same initial weights and dropout masks on every rank."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model) -> dict[str, list]:
    """The trainable parameters by optimizer group: ``lora`` (adapters) and ``bridge`` (when present)."""
    groups: dict[str, list] = {"lora": [], "bridge": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["bridge" if name.startswith("bridge.") else "lora"].append(p)
    return {g: ps for g, ps in groups.items() if ps}


def mask_answer_eos(batch: dict, eos_id: int) -> dict:
    """The batch with every end-of-sequence label ignored (``train.loss_eos: false``)."""
    out = dict(batch)
    for stream in STREAMS:
        lab = batch[f"{stream}_labels"]
        out[f"{stream}_labels"] = lab.masked_fill(lab == eos_id, IGNORE_INDEX)
    return out


def group_lr_lambda(group: str, total_steps: int, tcfg):
    """The LR multiplier of one group: warm-up/decay, times w(t) (lora) or 1 - w(t) (bridge) under
    ``train.curriculum: lr``."""
    from ckf_dist.model import curriculum_weight

    base = lr_lambda(total_steps, tcfg.warmup_ratio)
    if tcfg.curriculum != "lr":
        return base
    if group == "lora":
        return lambda step: base(step) * curriculum_weight(step, total_steps)
    return lambda step: base(step) * (1.0 - curriculum_weight(step, total_steps))


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return fn


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
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.uploader = uploader
        self.fault = parse_fault(fault)
        # CKF_SAMPLE_LOG=DIR: every rank appends the sample ids of each micro-batch (tests, audits)
        log_dir = os.environ.get("CKF_SAMPLE_LOG", "")
        self.sample_log = os.path.join(log_dir, f"samples_rank{rank}.jsonl") if log_dir else ""
        self.replay = os.environ.get("CKF_REPLAY", "")
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
        self.stream = ShardStream(cfg.data.output, split="train", rank=self.rank, world_size=self.world,
                                  seed=cfg.seed, shuffle_buffer=tcfg.shuffle_buffer, prefetch=tcfg.prefetch_shards)
        seed_everything(cfg.seed)
        self.ds_config = build_deepspeed_config(tcfg, self.world, cfg.model.dtype)
        # ZeRO-3: the frozen backbone is partitioned as it loads (no rank holds all of it);
        # otherwise every rank holds a full frozen copy.
        backbone, tokenizer = load_backbone(cfg.model, zero3_config=self.ds_config if tcfg.zero_stage == 3 else None)
        check_tokenizer(self.manifest, tokenizer)
        # recorded in the manifest: the backbone was partitioned before any rank held all of it
        self.partitioned_at_load = any(hasattr(p, "ds_id") for p in backbone.parameters())
        self.pad_id = int(self.manifest["tokenizer"]["pad_id"])
        self.eos_id = int(self.manifest["tokenizer"]["eos_id"])
        cf = load_cf_tables(cfg.data.output, manifest=self.manifest)
        model = build_ckf_model(cfg.model, backbone, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]),
                                n_tasks=N_TASKS)
        self.total_steps = self._total_steps()
        self.groups = param_groups(model)
        params = [p for ps in self.groups.values() for p in ps]
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
        per_step = t.micro_batch_size * t.grad_accum
        steps_per_epoch = self.stream.rows_per_rank() // per_step
        if steps_per_epoch == 0:
            raise TrainError(f"{self.cfg.data.output}: {self.stream.rows_per_rank()} training rows per worker is fewer "
                             f"than one step (micro_batch_size x grad_accum = {per_step}); use fewer workers or a smaller batch")
        total = math.ceil(t.epochs * steps_per_epoch) if t.epochs > 0 else t.max_steps
        return min(total, t.max_steps) if t.max_steps > 0 else total

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Restore from the newest committed checkpoint of this run, if any."""
        ref = store.latest_committed(self.cfg.train.storage, self.cfg.run_name)
        if ref is None:
            return False
        state = load_worker_checkpoint(self.engine, ref, self.rank, self.world)
        self.step = int(state["step"])
        self.stream.load_state_dict(state["cursor"])
        self.log.restore(ref)
        if self.rank == 0:
            print(f"[ckf] resumed from {ref.url} at step {self.step}/{self.total_steps}", flush=True)
        return True

    # ------------------------------------------------------------------ loop
    def batches(self):
        """Micro-batches of this rank's rows, epoch after epoch (a partial last batch is dropped)."""
        from ckf_dist.data.collate import collate

        if self.replay:
            yield from self.replay_batches()
            return
        mb = self.cfg.train.micro_batch_size
        while True:          # each pass over the stream is the rest of its current epoch
            rows = []
            for row in self.stream:
                rows.append(row)
                if len(rows) == mb:
                    yield collate(rows, self.pad_id)
                    rows = []

    def replay_batches(self):
        """The global micro-batches recorded by ``CKF_SAMPLE_LOG`` (all ranks' rows, rank order), for
        a one-worker rerun of a multi-worker run (``CKF_REPLAY=DIR``): same data, one process."""
        from ckf_dist.data.collate import collate

        if self.world != 1:
            raise TrainError("CKF_REPLAY replays a run's global batches in one worker; set train.num_workers=1")
        records: dict[tuple[int, int, int], list[int]] = {}
        for path in sorted(Path(self.replay).glob("samples_rank*.jsonl")):
            for line in path.read_text().splitlines():
                rec = json.loads(line)          # a step redone after a restart overwrites the first try
                records[(rec["step"], rec["micro"], rec["rank"])] = rec["sample_ids"]
        by_step: dict[tuple[int, int], list[int]] = {}
        for (step, micro, _rank), ids in sorted(records.items()):
            by_step.setdefault((step, micro), []).extend(ids)
        wanted = {i for ids in by_step.values() for i in ids}
        rows = {}
        for row in self.stream:
            if row["sample_id"] in wanted:
                rows[row["sample_id"]] = row
        for step in sorted(by_step):
            yield collate([rows[i] for i in by_step[step]], self.pad_id)

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

    def token_denominators(self, batch: dict) -> dict[str, float] | None:
        """Per-stream divisors that make the ranks' averaged gradient a mean over all their tokens
        (``train.loss_norm: sample``: over all their rows with an answer)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        def count(s):
            answer = batch[f"{s}_labels"][:, 1:] != IGNORE_INDEX
            return float(answer.any(1).sum() if self.cfg.train.loss_norm == "sample" else answer.sum())

        counts = torch.tensor([count(s) for s in STREAMS], dtype=torch.float64)
        dist.all_reduce(counts)
        return {s: max(float(c), 1.0) / self.world for s, c in zip(STREAMS, counts.tolist())}

    def train(self) -> dict:
        """Run until ``total_steps`` optimizer steps; checkpoint every ``save_every`` and at the end."""
        tcfg = self.cfg.train
        engine = self.engine
        t0, seen, tokens, micro = time.perf_counter(), 0, 0, 0
        acc: dict[str, float] = {}
        for batch in self.batches():
            if self.step >= self.total_steps:
                break
            if self.sample_log:
                with open(self.sample_log, "a") as fh:
                    fh.write(dump_json({"step": self.step, "micro": micro, "rank": self.rank,
                                        "sample_ids": batch["sample_ids"].tolist()}) + "\n")
            if not tcfg.loss_eos:
                batch = mask_answer_eos(batch, self.eos_id)
            denoms = self.token_denominators(batch)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            loss, stats = engine.module.loss(batch, step=self.step, total_steps=self.total_steps, mode=tcfg.mode,
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
            micro += 1
            if micro < tcfg.grad_accum:
                continue
            micro = 0
            self.step += 1
            acc.update(self.global_means(acc))
            dt = time.perf_counter() - t0
            lr_now = engine.get_lr()
            if len(lr_now) > 1:
                acc["lr_bridge"] = lr_now[1]
            self.log.step(self.step, self.total_steps, acc, lr=lr_now[0],
                          samples_per_s=seen * self.world / dt, tokens_per_s=tokens * self.world / dt)
            acc, t0, seen, tokens = {}, time.perf_counter(), 0, 0
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

    run_worker(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray_uploader, os.environ.get("CKF_FAULT", ""))


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
