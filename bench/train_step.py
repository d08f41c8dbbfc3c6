"""Benchmark: the CKF training step and checkpoint save, each against its limit, in one run.

1. Step: one real CKF optimizer step (a DeepSpeed ZeRO engine on one rank: text stream +
   CF stream through the Multi-LoRA backbone, curriculum loss, backward, AdamW) vs the
   frozen backbone's forward + backward alone on the same tokens (the same two token
   batches through a fresh copy of the backbone without adapters or bridge, loss on the
   same answer tokens, gradients flowing to the input embeddings as they must for the
   adapters of every layer). The ratio is of time per token (same tokens on both sides).
2. Save: ``Worker.save`` (ZeRO shards + gathered 16-bit export + manifest with sha256 of
   every file + commit marker, through the real store) vs a raw fsspec upload of the same
   bytes to the same storage (a copy of the staged folder, ``fs.put`` recursive).

Rounds are interleaved (A, B, A, B, ...). The step ratio is the median over rounds of
each round's own ratio (both sides ran the same batch one after the other, so a round's
ratio is per token and the machine's drift between rounds cancels); the ratio of the
per-side medians is kept too. The save ratio uses the per-side medians.

    python bench/train_step.py [--config configs/tiny-cpu.yaml] [--set KEY=VALUE ...] [--steps 8] [--wide]

``--wide`` swaps the config's backbone for a random Llama at a 7B-like width scaled to CPU
(hidden 2048, MLP 5504, 16 heads of 128 as in Llama-2-7B; 4 layers; the SmolLM2 vocabulary so
the prepared shards fit), saved to a temporary folder first. The adapters' and LoRA
dropout's cost per token grows with the width, the backbone's GEMMs with its square, so
SmolLM2-135M (hidden 576) is the least favourable shape for the step ratio and this one
is closer to the 7B+ backbones the trainer is for.

The dataset named by the config is prepared first if it is missing. Writes
bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def backbone_step(backbone, batch: dict) -> None:
    """Frozen backbone forward + backward on both streams' tokens (the limit)."""
    for stream in ("text", "cf"):
        ids, mask, labels = (batch[f"{stream}_input_ids"], batch[f"{stream}_attention_mask"],
                             batch[f"{stream}_labels"])
        emb = backbone.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = backbone.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        answer = target != -100
        logits = backbone.lm_head(hidden[:, :-1][answer]).float()
        F.cross_entropy(logits, target[answer]).backward()


WIDE = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=16)


def wide_backbone(folder: Path) -> Path:
    """A random Llama at a 7B-like width (``WIDE``), saved as a local backbone folder."""
    import transformers

    from ckf_dist.model.backbone import SMOLLM2_VOCAB

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=SMOLLM2_VOCAB, max_position_embeddings=2048,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      **WIDE)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def start_s3(work: Path) -> str:
    """A moto S3 server on a free loopback port (stopped at exit); returns a fresh bucket URL."""
    import atexit
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(proc.terminate)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench")
    for _ in range(200):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ckf-bench")
            return "s3://ckf-bench"
        except Exception:  # noqa: BLE001  (not listening yet)
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=8, help="timed rounds of each side (after one warm-up)")
    ap.add_argument("--saves", type=int, default=4, help="timed save rounds")
    ap.add_argument("--s3", action="store_true",
                    help="checkpoint to a real S3 server (moto, started on 127.0.0.1) instead of local disk")
    ap.add_argument("--wide", action="store_true",
                    help="backbone: a random Llama at a 7B-like width scaled to CPU (hidden 2048, 4 layers) "
                         "instead of the config's")
    ap.add_argument("--out", default=None,
                    help="JSON results (default bench/results/train_step.json, train_step-wide.json with --wide)")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed

    from ckf_dist.checkpoint import store
    from ckf_dist.storage import open_url
    from ckf_dist.config import load_config
    from ckf_dist.data.errors import DataError
    from ckf_dist.stages.prepare import run_prepare
    from ckf_dist.data.shards import read_dataset_manifest
    from ckf_dist.model import load_backbone
    from ckf_dist.train.worker import Worker

    work = Path(tempfile.mkdtemp(prefix="ckf-bench-step-"))
    storage = str(work / "ckpt")
    if args.s3:
        storage = start_s3(work)
    overrides = list(args.overrides)
    if args.wide:
        overrides.append(f"model.backbone={wide_backbone(work / 'wide-llama')}")
    cfg = load_config(args.config, [*overrides, "train.num_workers=1", f"train.storage={storage}",
                                    f"train.log_dir={work / 'logs'}", "run_name=bench", "train.max_steps=100000"])
    try:
        read_dataset_manifest(cfg.data.output)
    except DataError:
        run_prepare(cfg, overwrite=False, progress=False)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(os.cpu_count() or 1)

    fs, root = open_url(cfg.train.storage)
    raw_dest = f"{root}/raw-upload"

    phases: dict[str, float] = {}

    def timed_phase(name: str, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    def uploader(folder: Path, name: str, metrics: dict) -> None:
        t = time.perf_counter()
        dest = f"{root}/{cfg.run_name}/{name}"
        fs.makedirs(dest, exist_ok=True)
        fs.put(str(folder) + "/", dest, recursive=True)
        phases["upload"] = phases.get("upload", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        keep = work / "staged"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(folder, keep)                     # the same bytes, for the raw upload
        phases["bench copy"] = time.perf_counter() - t      # the bench's own work: taken out of the save below

    # Where the save's time goes (wrappers around the real functions, a few µs each).
    from ckf_dist.train import checkpointing
    for mod, attr, label in [(checkpointing, "gathered_trainable_state", "gather export"),
                             (checkpointing, "save_file", "write safetensors"),
                             (store, "hash_tree", "sha256 (beside upload)"), (store, "commit", "commit"),
                             (store, "apply_retention", "retention (background)")]:
        setattr(mod, attr, timed_phase(label, getattr(mod, attr)))

    worker = Worker(cfg, 0, 1, uploader)
    worker.build()
    engine = worker.engine
    engine.save_checkpoint = timed_phase("zero shards", engine.save_checkpoint)
    baseline, _ = load_backbone(cfg.model)
    if cfg.model.gradient_checkpointing:
        baseline.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    baseline.train()
    engine.train()
    batches = worker.batches()

    def ckf_step(batch: dict) -> None:
        loss, _ = engine.module.loss(batch, step=worker.step, total_steps=worker.total_steps, mode=cfg.train.mode)
        engine.backward(loss)
        engine.step()

    tokens = lambda b: int((b["text_attention_mask"].sum() + b["cf_attention_mask"].sum()))  # noqa: E731
    ckf_t, base_t, n_tok = [], [], []
    for r in range(args.steps + 1):
        batch = next(batches)
        t = time.perf_counter()
        ckf_step(batch)
        a = time.perf_counter() - t
        t = time.perf_counter()
        backbone_step(baseline, batch)
        b = time.perf_counter() - t
        baseline.zero_grad(set_to_none=True)
        if r:                                               # round 0 warms up
            ckf_t.append(a / tokens(batch))
            base_t.append(b / tokens(batch))
            n_tok.append(tokens(batch))
        print(f"  step round {r}: ckf {a * 1e3:.0f} ms, backbone-only {b * 1e3:.0f} ms, {tokens(batch)} tokens", flush=True)

    save_t, raw_t, sizes, breakdown = [], [], [], []
    for r in range(args.saves + 1):
        worker.step += 1
        phases.clear()
        t = time.perf_counter()
        worker.save()
        a = time.perf_counter() - t - phases.pop("bench copy")
        worker.join_retention()     # deleting older checkpoints runs beside training: timed apart, not in `save`
        staged = work / "staged"
        size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
        fs.rm(raw_dest, recursive=True) if fs.exists(raw_dest) else None
        t = time.perf_counter()
        fs.makedirs(raw_dest, exist_ok=True)
        fs.put(str(staged) + "/", raw_dest, recursive=True)
        b = time.perf_counter() - t
        if r:
            save_t.append(a)
            raw_t.append(b)
            sizes.append(size)
            breakdown.append(dict(phases))
        parts = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in phases.items())
        print(f"  save round {r}: save {a * 1e3:.0f} ms ({parts}), raw upload {b * 1e3:.0f} ms, "
              f"{size / 2**20:.2f} MiB", flush=True)

    med = statistics.median
    paired = [a / b for a, b in zip(ckf_t, base_t)]        # same batch on both sides
    result = {
        "config": args.config, "overrides": args.overrides, "backbone": "wide-llama" if args.wide else cfg.model.backbone,
        "backbone_shape": WIDE if args.wide else None,
        "zero_stage": cfg.train.zero_stage, "micro_batch_size": cfg.train.micro_batch_size,
        "storage": cfg.train.storage, "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "step_ms_per_1k_tokens": {"ckf": med(ckf_t) * 1e6, "backbone_only": med(base_t) * 1e6},
        "step_ratio": med(paired), "step_ratio_of_medians": med(ckf_t) / med(base_t),
        "step_ratios_per_round": paired, "tokens_per_step": med(n_tok),
        "save_ms": {"save": med(save_t) * 1e3, "raw_upload": med(raw_t) * 1e3}, "save_bytes": med(sizes),
        "save_ratio": med(save_t) / med(raw_t),
        "save_phases_ms": {k: med([d.get(k, 0.0) for d in breakdown]) * 1e3 for k in breakdown[0]},
        "targets": {"step_ratio": 1.15, "save_ratio": 1.5},
    }
    out = Path(args.out or REPO / "bench" / "results" / ("train_step-wide.json" if args.wide else "train_step.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nbackbone {result['backbone']}, ZeRO-{cfg.train.zero_stage}, {result['tokens_per_step']:.0f} tokens/step, "
          f"{result['threads']} threads")
    print(f"{'':14}{'ckf':>12}{'limit':>12}{'ratio':>8}{'target':>8}")
    print(f"{'step ms/1k tok':14}{med(ckf_t) * 1e6:12.1f}{med(base_t) * 1e6:12.1f}{result['step_ratio']:8.2f}{1.15:8.2f}"
          f"   (median of per-round ratios {min(paired):.2f}-{max(paired):.2f}; ratio of medians "
          f"{result['step_ratio_of_medians']:.2f})")
    print(f"{'save ms':14}{med(save_t) * 1e3:12.1f}{med(raw_t) * 1e3:12.1f}{result['save_ratio']:8.2f}{1.5:8.2f}")
    print("save phases (median ms): " + ", ".join(f"{k} {v:.0f}" for k, v in result["save_phases_ms"].items()))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
