"""Configuration of distributed training: workers, DeepSpeed, schedule, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal


# Environment variables handed to workers on a remote cluster (by name; values never enter configs or logs).
FORWARD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS", "HF_HOME", "CKF_CACHE",
               "CKF_STORAGE_OPTIONS", "CKF_STORAGE_TIMEOUT")      # workers open storage with the driver's options


# fsspec expands these in the paths it lists and deletes; storage folders must not contain them
GLOB_CHARS = "[]*?"


@dataclass
class TrainConfig:
    """Ray Train + DeepSpeed ZeRO settings and the optimisation schedule."""

    num_workers: int = 2
    # > 0: elastic (Ray Train's (min, max) worker range): start on as many workers between
    # min_workers and num_workers as the cluster gives, and after losing one go on with those
    # left (needs max_failures >= 1). Every size keeps the global batch micro_batch_size x
    # grad_accum x num_workers (grad_accum is set per size), so each size must divide it.
    min_workers: int = 0
    use_gpu: bool = False
    # extra Ray resources each worker asks for, e.g. a custom node resource {"trainer_slot": 1}
    worker_resources: dict[str, float] = field(default_factory=dict)
    address: str = ""                  # Ray cluster address; "" starts a local cluster
    storage: str = "runs/checkpoints"  # fsspec URL for checkpoints (local path, s3://, gs://)
    zero_stage: int = 2
    deepspeed_config: str = ""         # a user's DeepSpeed JSON whose keys override ours
    micro_batch_size: int = 4          # per worker
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-3
    adam_eps: float = 1e-6
    warmup_ratio: float = 0.05
    epochs: float = 3.0
    max_steps: int = 0                 # > 0 caps the number of optimizer steps
    mode: Literal["two_stream", "joint"] = "two_stream"
    # how w(t) acts: "loss" weighs the two streams' losses (eq. 6); "lr" multiplies the LoRA
    # group's learning rate by w(t) and the bridge group's by 1 - w(t) (a loss weight is divided
    # out by Adam); "none": both streams weigh 0.5 throughout (ablation)
    curriculum: Literal["loss", "lr", "none"] = "loss"
    lr_bridge: float = 0.0             # the bridge's learning rate; 0 = lr
    loss_norm: Literal["token", "sample"] = "token"   # mean over answer tokens, or per sample then over samples
    loss_eos: bool = True              # the answer's end-of-sequence token counts in the loss
    group_norms: bool = True           # log per-group (lora, bridge) gradient and update norms every log step
    # Tasks are mixed within every batch in proportion to their rows: the split's shards hold
    # all tasks and the seeded shuffle buffer interleaves them (the paper's setting).
    task_sampler: Literal["proportional"] = "proportional"
    shuffle_buffer: int = 1024
    # Shards each worker fetches, verifies and decodes ahead of the step (up to 4 threads);
    # memory ~ this many decoded shards (~3 MB each at the default data.shard_rows for ML-100k)
    prefetch_shards: int = 8
    save_every: int = 50               # optimizer steps between checkpoints
    num_to_keep: int = 2
    max_failures: int = 0
    log_every: int = 1
    grad_clip: float = 1.0
    export_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"   # the gathered trainable export
    log_dir: str = "runs/logs"         # JSONL + TensorBoard, written by rank 0 (local to its node)
    forward_env: list[str] = field(default_factory=lambda: list(FORWARD_ENV))  # names passed to a remote cluster

    @property
    def global_batch(self) -> int:
        """Rows of one optimizer step over all workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers

    def on_workers(self, world: int) -> "TrainConfig":
        """This config as run on ``world`` workers: ``grad_accum`` set to keep the global batch."""
        if world == self.num_workers:
            return self
        accum, rest = divmod(self.global_batch, self.micro_batch_size * world)
        if rest or accum < 1:
            raise ValueError(f"num_workers: {world} workers cannot keep the global batch of {self.global_batch} rows "
                             f"at micro_batch_size {self.micro_batch_size}")
        return replace(self, num_workers=world, grad_accum=accum)

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if not 0 <= self.min_workers <= self.num_workers:
            raise ValueError(f"min_workers: must be in [0, num_workers={self.num_workers}] (0: a fixed number), "
                             f"got {self.min_workers}")
        if self.min_workers:
            sizes = range(self.min_workers, self.num_workers + 1)
            bad = [w for w in sizes if self.global_batch % (self.micro_batch_size * w)]
            if bad:
                raise ValueError(f"min_workers: on {bad} worker(s) no grad_accum keeps the global batch of "
                                 f"{self.global_batch} rows (micro_batch_size {self.micro_batch_size} x grad_accum "
                                 f"{self.grad_accum} x num_workers {self.num_workers}); choose a range whose sizes divide it")
            if self.max_failures < 1:
                raise ValueError("min_workers: an elastic run goes on after losing a worker only with max_failures >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch_size: micro_batch_size and grad_accum must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.lr_bridge < 0:
            raise ValueError(f"lr_bridge: must be >= 0 (0 = lr), got {self.lr_bridge}")
        if self.curriculum not in ("loss", "lr", "none"):
            raise ValueError(f"curriculum: 'loss', 'lr' or 'none', got {self.curriculum!r}")
        if self.loss_norm not in ("token", "sample"):
            raise ValueError(f"loss_norm: 'token' or 'sample', got {self.loss_norm!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("epochs: set epochs > 0 or max_steps > 0")
        if self.prefetch_shards < 0:
            raise ValueError(f"prefetch_shards: must be >= 0 (0: read each shard when it is needed), "
                             f"got {self.prefetch_shards}")
        if self.save_every < 1:
            raise ValueError(f"save_every: must be >= 1, got {self.save_every}")
        if self.num_to_keep < 1:
            raise ValueError(f"num_to_keep: must be >= 1, got {self.num_to_keep}")
        if any(c in self.storage for c in GLOB_CHARS):
            raise ValueError(f"storage: fsspec reads '[', ']', '*' and '?' as glob patterns when it lists and "
                             f"deletes checkpoints; use a path without them, got {self.storage!r}")
