"""Distributed training end to end: real Ray (local cluster on loopback), real DeepSpeed ZeRO
engines on gloo, checkpoints on a real S3 server (moto on 127.0.0.1).

Each run is `ckf train` in its own process, as a user runs it (~40 s each on 2 cores), so
one module-scoped set of runs feeds several tests:

- ``base``: 2 workers, ZeRO-2, 4 steps, uninterrupted, checkpoints to S3;
- ``killed``: the same (on local storage), but rank 1 is SIGKILLed after step 3 and
  ``max_failures=1`` lets Ray restart the group, which resumes from the step-2 checkpoint;
- ``elastic``: ``base`` again, but as a chain of two runs: 2 workers, stopped by a fault right
  after the step-1 checkpoint, then 1 worker with grad_accum 2 (the same global batch)
  resuming it, which must equal ``base`` sample for sample and in its weights (a chain that
  starts on 1 worker differs from ``base`` in its first Adam step, which is close to lr *
  sign(g): a gradient element near 0 summed in another order moved one LoRA weight by
  1.2e-5, measured);
- ``zero3``: the same run under ZeRO-3 as a chain of 2, then 1, then 2 workers, also equal to
  ``base`` (the CKF parts are seeded on their own, and the tiny backbone partitioned at load
  has the plain load's weights, so ZeRO-2 and ZeRO-3 train the same model from the same start);
- a 2-node cluster that loses a node mid-run (``train.min_workers``), equal to ``base``: the
  2 -> 1 direction under ZeRO-2.
"""

from __future__ import annotations

import json
import os
import re
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


def run(cfg, tmp: Path, fails: bool = False, **env) -> tuple[dict, Path]:
    """``ckf train`` in a fresh process, as a user runs it: its own local Ray cluster (loopback),
    the environment of this test (S3 endpoint and credentials) plus ``env``; bounded in time.
    ``fails``: the run must end with an error (an injected fault), after a committed checkpoint."""
    log = tmp / f"samples-{cfg.run_name}"
    log.mkdir(parents=True, exist_ok=True)
    config = tmp / f"{cfg.run_name}-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(dump_config(cfg))
    child_env = {k: v for k, v in os.environ.items() if k not in ("CKF_FAULT", "RAY_ADDRESS")}
    child_env.update(CKF_SAMPLE_LOG=str(log), **env)
    proc = subprocess.run([str(Path(sys.executable).parent / "ckf"), "train", str(config)], env=child_env,
                          capture_output=True, text=True, timeout=600)
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if fails:
        assert proc.returncode != 0 and "injected fault" in proc.stderr, output
        # one line naming the worker's error and its traceback file; the console carries none of
        # the worker's own frames (Ray prints the raise in train_loop_per_worker per failed rank)
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"ckf: error: training run '{cfg.run_name}' failed: rank ") and "injected fault" in last
        trace = Path(re.search(r"traceback: (\S+) on rank", last).group(1))
        assert "in _maybe_fault" in trace.read_text(), trace.read_text()
        frames = [line for line in proc.stderr.splitlines() if 'File "' in line and "ckf_dist" in line]
        assert len(frames) <= 2 * cfg.train.num_workers and "_maybe_fault" not in proc.stderr, output
    else:
        assert proc.returncode == 0, f"ckf train failed ({proc.returncode}):\n{output}"
    ref = store.latest_committed(cfg.train.storage, cfg.run_name)
    assert ref is not None, proc.stdout[-2000:]
    assert fails or f"checkpoint: {ref.url}" in proc.stdout
    return {"step": ref.step, "checkpoint": ref.url, "stdout": proc.stdout}, log


def elastic_chain(cfg, tmp: Path, segments: list[dict]) -> tuple[list[dict], Path]:
    """``cfg``'s run as a chain of ``ckf train`` runs, segment i with ``segments[i]``'s train
    fields (``num_workers``, say), each after the first resuming the last one's checkpoint; all
    but the last stopped by a fault after step i + 1."""
    out = []
    for i, fields in enumerate(segments):
        last = i == len(segments) - 1
        seg = config_from_dict(dict(json.loads(json.dumps(_as_dict(cfg))),
                                    train={**_as_dict(cfg)["train"], **fields, "save_every": 1}), "<chain>")
        result, log = run(seg, tmp, fails=not last, **({} if last else {"CKF_FAULT": f"raise@{i + 1}"}))
        assert result["step"] == (cfg.train.max_steps if last else i + 1), result
        out.append(result)
    return out, log


def _as_dict(cfg) -> dict:
    from ckf_dist.config import config_to_dict

    return config_to_dict(cfg)


def global_batches(log: Path) -> dict[int, list[int]]:
    """step -> the sample ids of its global batch, in rank order then micro-batch order (the
    order of the global sequence), from the last try of each step: the records of the world
    size that wrote the step last (a group that died mid-step may have left some of its ranks')."""
    records = sample_records(log)
    last_world = {}
    for r in sorted(records, key=lambda r: r["t"]):
        last_world[r["step"]] = r["world"]
    last = {(r["step"], r["micro"], r["rank"]): r["sample_ids"] for r in records if r["world"] == last_world[r["step"]]}
    out: dict[int, list[int]] = {}
    for (step, _micro, _rank), ids in sorted(last.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        out.setdefault(step, []).extend(ids)
    return out


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
    out["elastic"] = elastic_chain(train_cfg(prepared_dataset.url, str(tmp / "elastic-ckpt"), "elastic"),
                                   tmp, [{"num_workers": 2}, {"num_workers": 1}])
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


def assert_chain_equals(chain, chain_log: Path, ref_result: dict, ref_log: Path, workers: list[int],
                        steps: int) -> None:
    """The chain (on ``workers[i]`` workers in segment i) saw the uninterrupted run's global
    batches, none twice, and ends at its weights."""
    for before, now, result in zip(workers, workers[1:], chain[1:]):
        assert (f"resharded for {now}" in result["stdout"]) == (now != before), result["stdout"][-2000:]
    want, got = global_batches(ref_log), global_batches(chain_log)
    assert sorted(got) == list(range(steps)) and got == want
    seen = [i for ids in got.values() for i in ids]
    assert len(seen) == len(set(seen))
    a = export_of(store.resolve_checkpoint(ref_result["checkpoint"]))
    b = export_of(store.resolve_checkpoint(chain[-1]["checkpoint"]))
    assert_close_states(a, b, rtol=1e-4, atol=1e-5)


def test_resume_on_another_number_of_workers_equals_the_uninterrupted_run(runs):
    """2 workers, then 1 worker with grad_accum 2, ZeRO-2: the uninterrupted 2-worker run's
    samples per global batch, in order, and its trainable weights."""
    base, base_log = runs["base"]
    chain, chain_log = runs["elastic"]
    assert "grad_accum 1 -> 2 keeps the global batch" in chain[1]["stdout"]
    assert_chain_equals(chain, chain_log, base, base_log, workers=[2, 1], steps=4)
    # the 1-worker segment ran each global batch as two micro-batches of one rank
    recs = [r for r in sample_records(chain_log) if r["step"] == 1]
    assert {(r["micro"], r["rank"]) for r in recs} == {(0, 0), (1, 0)}


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


def test_zero3_chain_of_2_1_2_workers_equals_the_zero2_run_and_exports_full_shapes(runs, prepared_dataset, tmp_path):
    """ZeRO-3 as 2 -> 1 -> 2 workers (partitions re-made from the gathered state each time), on
    S3, ends where the uninterrupted 2-worker ZeRO-2 run ends; its export has the full shapes."""
    from ckf_dist.data import load_cf_tables
    from ckf_dist.model import build_ckf_model, load_backbone

    from conftest import make_bucket

    base, base_log = runs["base"]
    bucket = make_bucket(f"ckf-z3-{uuid.uuid4().hex[:8]}")     # ZeRO-3's per-rank shards on S3
    cfg = train_cfg(prepared_dataset.url, bucket, "z3-chain", zero_stage=3)
    chain, chain_log = elastic_chain(cfg, tmp_path, [{"num_workers": 2}, {"num_workers": 1}, {"num_workers": 2}])
    assert "grad_accum 1 -> 2 keeps the global batch" in chain[1]["stdout"]
    assert_chain_equals(chain, chain_log, base, base_log, workers=[2, 1, 2], steps=4)
    ref = store.resolve_checkpoint(chain[-1]["checkpoint"])
    assert ref.manifest["zero_stage"] == 3 and ref.manifest["backbone_partitioned_at_load"] is True
    assert ref.manifest["world_size"] == 2 and os.path.basename(ref.url) == "step_00000004"
    exported = export_of(ref)
    backbone, _ = load_backbone(cfg.model)
    cf = load_cf_tables(prepared_dataset.url)
    model = build_ckf_model(cfg.model, backbone, torch.from_numpy(cf["user"]), torch.from_numpy(cf["item"]))
    want = model.trainable_state_dict()
    assert exported.keys() == want.keys()
    for k, v in want.items():
        assert exported[k].shape == v.shape and exported[k].numel() > 0, k
    lora_b = [k for k in want if "lora_shared_B" in k or "lora_task_B" in k]
    assert lora_b and any(exported[k].abs().sum() > 0 for k in lora_b), "LoRA B still zero after 4 steps"


def test_elastic_run_goes_on_with_the_workers_left_after_losing_a_node(runs, prepared_dataset, tmp_path):
    """``train.min_workers``: a 2-worker run on a 2-node Ray cluster (loopback) loses a node after
    step 2; Ray Train restarts the group on the one worker left, which resumes the committed
    step with grad_accum 2 and ends equal to the uninterrupted 2-worker run."""
    import time

    from ray.cluster_utils import Cluster

    # one trainer slot per node, so the two workers sit on different nodes (both on this machine)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"trainer_slot": 1}})
    try:
        node = cluster.add_node(num_cpus=1, resources={"trainer_slot": 1})
        storage = str(tmp_path / "ckpt")
        cfg = train_cfg(prepared_dataset.url, storage, "elastic-node", min_workers=1, max_failures=2, save_every=1,
                        worker_resources={"trainer_slot": 1}, address=cluster.address)
        log = tmp_path / "samples-elastic-node"
        log.mkdir()
        config = tmp_path / "elastic-node.yaml"
        config.write_text(dump_config(cfg))
        env = {k: v for k, v in os.environ.items() if k not in ("CKF_FAULT", "RAY_ADDRESS")}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "ckf"), "train", str(config)],
                                env=dict(env, CKF_SAMPLE_LOG=str(log)), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ref = store.latest_committed(storage, "elastic-node")
            if ref is not None and ref.step >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        cluster.remove_node(node, allow_graceful=False)          # the node and its worker are gone
        output = proc.communicate(timeout=600)[0]
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, output[-4000:]
    assert "running on 1 of up to 2 workers: grad_accum 2" in output, output[-3000:]
    base, base_log = runs["base"]
    assert global_batches(log) == global_batches(base_log)
    ref = store.latest_committed(storage, "elastic-node")
    assert ref.step == 4 and ref.manifest["world_size"] == 1
    assert_close_states(export_of(store.resolve_checkpoint(base["checkpoint"])), export_of(ref), rtol=1e-4, atol=1e-5)
