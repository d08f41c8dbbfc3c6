"""Measure one training step's peak tensor memory, for the ``ckf plan`` test.

``python tests/memory_probe.py CONFIG.yaml OUT.json``: builds the run's worker in this
process (world of one, its real DeepSpeed engine), takes one optimizer step while counting
the bytes of every tensor storage alive (the model's parameters and buffers, DeepSpeed's flat
partitions, then everything the step creates: gradients, optimizer states, activations,
temporaries, each dropped when freed) and writes the peak with the step's shape. (torch's own
``MemTracker`` hooks every parameter, frozen ones included, and refuses a frozen backbone.)
"""

from __future__ import annotations

import json
import os
import sys
import weakref

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of distinct tensor storages alive: those registered, and every op's outputs."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr() or id(st)
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def main(config: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("CKF_PROBE_PORT", "29561"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from ckf_dist.config import load_config
    from ckf_dist.contract import IGNORE_INDEX, STREAMS
    from ckf_dist.train.worker import Worker

    cfg = load_config(config)
    worker = Worker(cfg, 0, 1, uploader=None)
    worker.build()
    micro = next(worker.steps())
    engine = worker.engine
    zero = engine.optimizer
    tracker = LiveBytes()
    for t in [*engine.module.parameters(), *engine.module.buffers()]:
        tracker.add(t)
    for name in ("single_partition_of_fp32_groups", "bit16_groups_flat", "fp32_partitioned_groups_flat"):
        for t in getattr(zero, name, None) or []:
            tracker.add(t)
    static = tracker.now
    with tracker:
        worker.train_step(micro)
    lengths = [int(b[f"{s}_input_ids"].shape[1]) for b in micro for s in STREAMS]
    answers = [int((b[f"{s}_labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro for s in STREAMS]
    with open(out, "w") as fh:
        json.dump({"peak": tracker.peak, "static": static, "length": max(lengths), "answer": max(answers) / cfg.train.micro_batch_size,
                   "micro_batch": cfg.train.micro_batch_size, "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
