"""Distributed training end to end: real Ray (local cluster on loopback), real DeepSpeed ZeRO
engines on gloo, checkpoints on a real S3 server (moto on 127.0.0.1).

Each run is `ckf train` in its own process, as a user runs it (~40 s each on 2 cores), so
one module-scoped set of runs feeds several tests:

- ``base``: 2 workers, ZeRO-2, 4 steps, uninterrupted, checkpoints to S3;
- ``killed``: the same (on local storage), but rank 1 is SIGKILLed after step 3 and
  ``max_failures=1`` lets Ray restart the group, which resumes from the step-2 checkpoint;
- ``one``: 1 worker replaying ``base``'s global batches (``CKF_REPLAY``);
- ``zero3``: 2 workers, ZeRO-3, 2 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
pytest.importorskip("deepspeed")

from ckf_dist.checkpoint import store  # noqa: E402
from ckf_dist.config import config_from_dict, dump_config  # noqa: E402
from ckf_dist.storage import open_url

pytestmark = [pytest.mark.timeout(900), pytest.mark.ray]


def train_cfg(data_url: str, storage: str, run_name: str, **train):
    t = {"num_workers": 2, "zero_stage": 2, "micro_batch_size": 2, "grad_accum": 1, "lr": 5e-3, "max_steps": 4,
         "save_every": 2, "num_to_keep": 3, "shuffle_buffer": 16, "warmup_ratio": 0.0, "export_dtype": "float32",
         "storage": storage}
    t.update(train)
    return config_from_dict({
        "run_name": run_name, "seed": 3, "data": {"output": data_url},
        "model": {"backbone": "tiny-llama", "dtype": "float32", "lora": {"r": 4, "alpha": 16, "dropout": 0.0}},
        "train": t,
    }, "<test_train_ray>")


def run(cfg, tmp: Path, **env) -> tuple[dict, Path]:
    """``ckf train`` in a fresh process, as a user runs it: its own local Ray cluster (loopback),
    the environment of this test (S3 endpoint and credentials) plus ``env``; bounded in time."""
    log = tmp / f"samples-{cfg.run_name}"
    log.mkdir(parents=True, exist_ok=True)
    config = tmp / f"{cfg.run_name}-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(dump_config(cfg))
    child_env = {k: v for k, v in os.environ.items() if k not in ("CKF_FAULT", "CKF_REPLAY", "RAY_ADDRESS")}
    child_env.update(CKF_SAMPLE_LOG=str(log), **env)
    proc = subprocess.run([str(Path(sys.executable).parent / "ckf"), "train", str(config)], env=child_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ckf train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ref = store.latest_committed(cfg.train.storage, cfg.run_name)
    assert ref is not None, proc.stdout[-2000:]
    assert f"checkpoint: {ref.url}" in proc.stdout
    return {"step": ref.step, "checkpoint": ref.url}, log


def export_of(ref) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    fs, path = open_url(ref.url)
    with fs.open(f"{path}/export/trainable.safetensors", "rb") as fh:
        return load(fh.read())


def sample_records(log: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(log.glob("samples_rank*.jsonl")) for line in p.read_text().splitlines()]


def effective_samples(log: Path) -> dict[tuple, list[int]]:
    """(step, micro, rank) -> sample ids, the last try of each (a redone step replaces the first)."""
    return {(r["step"], r["micro"], r["rank"]): r["sample_ids"] for r in sample_records(log)}


def assert_close_states(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(s3_server, prepared_dataset, tmp_path_factory):
    """The runs the tests below share; the S3 server (and its environment) is up before the first."""
    from conftest import make_bucket

    tmp = tmp_path_factory.mktemp("train")
    bucket = make_bucket(f"ckf-train-{uuid.uuid4().hex[:8]}")
    out = {"bucket": bucket, "tmp": tmp, "data": prepared_dataset.url}
    out["base"] = run(train_cfg(prepared_dataset.url, bucket, "base"), tmp)
    once = tmp / "killed-once"
    # Local storage for the killed run: a SIGKILLed client can leave the moto server (a
    # development server) blocked on a half-sent request for minutes, which real S3 is not.
    out["killed"] = run(train_cfg(prepared_dataset.url, str(tmp / "killed-ckpt"), "killed", max_failures=1),
                        tmp, CKF_FAULT=f"kill@3:rank=1:once={once}")
    out["killed_once"] = once
    out["one"] = run(train_cfg(prepared_dataset.url, str(tmp / "local-ckpt"), "one", num_workers=1,
                               micro_batch_size=4), tmp, CKF_REPLAY=str(out["base"][1]))
    return out


def test_two_workers_zero2_train_and_commit_to_s3(runs):
    result, log = runs["base"]
    assert result["step"] == 4 and result["checkpoint"].startswith(runs["bucket"] + "/base/step_00000004")
    ref = store.resolve_checkpoint(result["checkpoint"])
    store.verify(ref)                                                   # every file listed, sizes match
    assert ref.manifest["world_size"] == 2 and ref.manifest["zero_stage"] == 2
    assert ref.manifest["backbone_partitioned_at_load"] is False
    steps = {r["step"] for r in sample_records(log)}
    assert steps == {0, 1, 2, 3}
    metrics = [json.loads(line) for line in
               open_url(ref.url)[0].open(f"{open_url(ref.url)[1]}/metrics.jsonl").read().decode().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"loss", "loss_text", "loss_cf", "w", "lr", "samples_per_s", "tokens_per_s"} <= m.keys() for m in metrics)
    # the schedule is visible: per-group gradient and update norms, the bridge's LR, slot-token scale
    norms = {"grad_norm/lora", "grad_norm/bridge", "update_norm/lora", "update_norm/bridge", "lr_bridge",
             "slot_norm_user", "slot_norm_item", "embed_norm"}
    assert all(norms <= m.keys() for m in metrics), metrics[0].keys()
    assert all(m["grad_norm/lora"] > 0 and m["update_norm/bridge"] > 0 for m in metrics[1:])


def test_sigkill_mid_run_restarts_and_equals_uninterrupted(runs):
    base, base_log = runs["base"]
    killed, killed_log = runs["killed"]
    assert runs["killed_once"].exists(), "the fault was never injected"
    assert killed["step"] == 4
    raw = sample_records(killed_log)
    tries = [(r["step"], r["micro"], r["rank"]) for r in raw]
    assert len(tries) > len(set(tries)), "no step was redone: the run did not restart"
    # the same samples at the same steps on the same ranks, and none twice in the trajectory
    eff_base, eff_killed = effective_samples(base_log), effective_samples(killed_log)
    assert eff_killed == eff_base
    seen = [i for ids in eff_killed.values() for i in ids]
    assert len(seen) == len(set(seen)) == 4 * 2 * 2
    a = export_of(store.resolve_checkpoint(base["checkpoint"]))
    b = export_of(store.resolve_checkpoint(killed["checkpoint"]))
    assert_close_states(a, b, rtol=1e-5, atol=1e-6)
    init = export_of(store.resolve_checkpoint(f"{runs['bucket']}/base/step_00000002"))
    assert any(not torch.equal(a[k], init[k]) for k in a), "steps 3-4 changed nothing"


def test_two_workers_match_one_worker_on_the_same_global_batches(runs):
    base, _ = runs["base"]
    one, one_log = runs["one"]
    eff = effective_samples(one_log)
    eff_base = effective_samples(runs["base"][1])
    for step in range(4):          # the one worker saw exactly the union of the two ranks' rows
        assert sorted(eff[(step, 0, 0)]) == sorted(eff_base[(step, 0, 0)] + eff_base[(step, 0, 1)])
    a = export_of(store.resolve_checkpoint(base["checkpoint"]))
    b = export_of(store.resolve_checkpoint(one["checkpoint"]))
    assert_close_states(a, b, rtol=1e-4, atol=1e-5)


def test_rerun_resumes_from_latest_commit_and_ignores_uncommitted(runs):
    bucket, tmp = runs["bucket"], runs["tmp"]
    fs, root = open_url(bucket)
    # an interrupted save: files, even a manifest, but no commit marker
    fs.pipe(f"{root}/base/step_00000005/manifest.json", b'{"step": 5}')
    fs.pipe(f"{root}/base/step_00000005/export/trainable.safetensors", b"garbage")
    assert store.latest_committed(bucket, "base").step == 4
    result, log = run(train_cfg(runs["data"], bucket, "base", max_steps=6), tmp / "rerun")
    assert result["step"] == 6
    steps = sorted({r["step"] for r in sample_records(log)})
    assert steps == [4, 5], f"the rerun trained steps {steps}, not just the missing ones"
    assert store.latest_committed(bucket, "base").step == 6


def test_zero3_two_workers_export_is_full_shaped(s3_server, prepared_dataset, tmp_path):
    from ckf_dist.data import load_cf_tables
    from ckf_dist.model import build_ckf_model, load_backbone

    from conftest import make_bucket

    bucket = make_bucket(f"ckf-z3-{uuid.uuid4().hex[:8]}")
    cfg = train_cfg(prepared_dataset.url, bucket, "z3", zero_stage=3, max_steps=2)
    result, _ = run(cfg, tmp_path)
    ref = store.resolve_checkpoint(result["checkpoint"])
    assert ref.manifest["zero_stage"] == 3 and ref.manifest["backbone_partitioned_at_load"] is True
    exported = export_of(ref)
    backbone, _ = load_backbone(cfg.model)
    cf = load_cf_tables(prepared_dataset.url)
    model = build_ckf_model(cfg.model, backbone, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]))
    want = model.trainable_state_dict()
    assert exported.keys() == want.keys()
    for k, v in want.items():
        assert exported[k].shape == v.shape and exported[k].numel() > 0, k
    lora_b = [k for k in want if "lora_shared_B" in k or "lora_task_B" in k]
    assert lora_b and any(exported[k].abs().sum() > 0 for k in lora_b), "LoRA B still zero after 2 steps"
    assert os.path.basename(ref.url) == "step_00000002"
