"""``ckf consolidate``: committed checkpoint (local disk, moto S3) -> bridge + peft adapters + metadata."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file, save_file

from ckf_dist.stages.consolidate import consolidate
from ckf_dist.checkpoint.store import COMMIT_MARKER, CheckpointError

CHILD = r"""
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM, PeftModel

base_dir, adapters, inputs, out_path = sys.argv[1:5]
batch = load_file(inputs)
out = {}
for task in sys.argv[5:]:
    if base_dir == "-":      # the base the adapter names (base_model_name_or_path), resolved by peft
        model = AutoPeftModelForCausalLM.from_pretrained(adapters + "/" + task, dtype=torch.float32).eval()
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapters + "/" + task).eval()
    with torch.no_grad():
        out[task] = model(input_ids=batch[task + "/ids"], attention_mask=batch[task + "/mask"]).logits.contiguous()
save_file(out, out_path)
assert not any(m == "ckf_dist" or m.startswith("ckf_dist.") for m in sys.modules), "child imported ckf_dist"
"""


def _text_batches(dataset, per_task: int = 2) -> dict:
    """A few test rows per task, collated (text stream is what the peft adapters reproduce)."""
    from ckf_dist.data.collate import collate
    from ckf_dist.data.stream import ShardStream

    rows: dict[str, list] = {}
    for row in ShardStream(dataset.url, "test", shuffle_buffer=1, prefetch=0, drop_remainder=False):
        if len(rows.setdefault(row["task"], [])) < per_task:
            rows[row["task"]].append(row)
    return {t: collate(r, dataset.manifest["tokenizer"]["pad_id"]) for t, r in rows.items()}


def _peft_reproduces_logits(model, batches: dict, tmp_path, base: str, adapters: str, **run) -> dict:
    """Plain peft in a child process that never imports ckf_dist (CHILD: ``base`` a folder, or "-"
    for the base the adapters name) gives the CKF text-stream logits of every task's batch."""
    tensors, expected = {}, {}
    with torch.no_grad():
        for task, b in batches.items():
            tensors[f"{task}/ids"], tensors[f"{task}/mask"] = b["text_input_ids"], b["text_attention_mask"]
            expected[task] = model(b["text_input_ids"], b["text_attention_mask"], b["task_ids"])
    save_file(tensors, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.run([sys.executable, str(tmp_path / "child.py"), base, adapters, str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "got.safetensors"), *batches], capture_output=True, text=True, timeout=300,
                          **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(tmp_path / "got.safetensors"))
    for task, logits in expected.items():
        mask = batches[task]["text_attention_mask"].bool()
        torch.testing.assert_close(got[task][mask], logits[mask], rtol=0, atol=1e-4, msg=task)
    return expected


def test_consolidate_local_adapters_match_in_plain_peft(prepared_dataset, tmp_path):
    ref, model = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    out = consolidate(ref.url, tmp_path / "out", progress=False)

    meta = json.loads((out / "ckf_meta.json").read_text())
    assert meta["step"] == 4 and meta["backbone"] == "tiny-llama" and meta["source"] == "export"
    assert meta["tokenizer"]["fingerprint"] == prepared_dataset.manifest["tokenizer"]["fingerprint"]
    assert meta["tasks"] == ["ctr", "sequential", "rating", "review"] and meta["metrics"]["step"] == 4
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").read_text().count("\n") == 4
    bridge = load_file(str(out / "bridge.safetensors"))
    own = {k[len("bridge."):]: v for k, v in model.trainable_state_dict().items() if k.startswith("bridge.")}
    assert set(bridge) == set(own) and all(torch.equal(bridge[k], own[k]) for k in own)
    conf = json.loads((out / "adapters" / "ctr" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "tiny-llama"
    from transformers import AutoTokenizer

    from ckf_dist.resources import tokenizer_fingerprint

    beside = AutoTokenizer.from_pretrained(out / meta["tokenizer_dir"])   # the dataset's tokenizer, saved beside
    assert tokenizer_fingerprint(beside) == prepared_dataset.manifest["tokenizer"]["fingerprint"]

    # plain peft in a process that never imports ckf_dist reproduces the CKF text-stream logits per task
    from ckf_dist.model import ModelConfig, load_backbone

    fresh, _ = load_backbone(ModelConfig(backbone="tiny-llama"))  # the untouched backbone (tiny ones are seeded)
    fresh.save_pretrained(tmp_path / "base")
    batches = _text_batches(prepared_dataset)
    expected = _peft_reproduces_logits(model, batches, tmp_path, str(tmp_path / "base"), str(out / "adapters"))
    b = batches["ctr"]                                           # the task adapters differ
    with torch.no_grad():
        other = model(b["text_input_ids"], b["text_attention_mask"], torch.full_like(b["task_ids"], 2))
    assert (other - expected["ctr"]).abs().max() > 1e-3


def test_consolidate_with_backbone_is_whole_when_moved(prepared_dataset, tmp_path):
    """--with-backbone: the folder carries the backbone and its tokenizer, the adapters name it
    relative to the folder, and moved elsewhere it reproduces the CKF logits through plain peft."""
    import os
    import shutil

    from transformers import AutoTokenizer

    from ckf_dist.resources import tokenizer_fingerprint

    ref, model = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    out = consolidate(ref.url, tmp_path / "out", progress=False, with_backbone=True)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    meta = json.loads((moved / "ckf_meta.json").read_text())
    assert meta["base_model_name_or_path"] == "backbone" and meta["backbone_dir"] == "backbone"
    conf = json.loads((moved / "adapters" / "ctr" / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == "backbone"
    assert not [p for p in moved.parent.iterdir() if p.name != "run"]        # no temp folder left
    beside = AutoTokenizer.from_pretrained(moved / "backbone")
    assert tokenizer_fingerprint(beside) == prepared_dataset.manifest["tokenizer"]["fingerprint"]

    env = dict(os.environ, HOME=str(tmp_path / "home"), CKF_CACHE=str(tmp_path / "no-cache"))
    # "-": the base the adapters name; peft resolves the relative name from the working directory
    _peft_reproduces_logits(model, _text_batches(prepared_dataset, per_task=1), tmp_path, "-", "adapters",
                            cwd=moved, env=env)


def test_consolidate_from_s3(prepared_dataset, s3_url, tmp_path):
    ref, model = make_checkpoint(s3_url, prepared_dataset, run="s3run", step=6)
    assert ref.url.startswith("s3://")
    out = consolidate(f"{s3_url}/s3run", tmp_path / "out", progress=False)   # a run folder: its latest checkpoint
    meta = json.loads((out / "ckf_meta.json").read_text())
    assert meta["step"] == 6 and meta["checkpoint"].startswith("s3://")
    trainable = load_file(str(out / "trainable.safetensors"))
    own = model.trainable_state_dict()
    assert set(trainable) == set(own) and all(torch.equal(trainable[k], own[k]) for k in own)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["ctr", "rating", "review", "sequential"]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_consolidate_errors(prepared_dataset, tmp_path):
    ref, _ = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    ckpt = tmp_path / "ckpts" / "ckpt-run" / "step_00000004"
    export = ckpt / "export" / "trainable.safetensors"
    original = export.read_bytes()

    _flip_byte(export)                                           # corrupt shard: same size, other bytes
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        consolidate(str(ckpt), tmp_path / "o1", progress=False)
    export.write_bytes(original)

    export.unlink()                                              # missing shard
    with pytest.raises(CheckpointError, match="missing"):
        consolidate(str(ckpt), tmp_path / "o2", progress=False)
    export.write_bytes(original)

    (ckpt / COMMIT_MARKER).unlink()                              # never committed
    with pytest.raises(CheckpointError, match="COMMITTED"):
        consolidate(str(ckpt), tmp_path / "o3", progress=False)
    with pytest.raises(CheckpointError, match="none committed"):
        consolidate(str(tmp_path / "ckpts" / "ckpt-run"), tmp_path / "o4", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_consolidate_verify_hashes_files_it_does_not_read(prepared_dataset, tmp_path):
    """A resume-only file corrupted at the same size passes a plain consolidation, not --verify."""
    make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset)
    ckpt = tmp_path / "ckpts" / "ckpt-run" / "step_00000004"
    state = ckpt / "state" / "rank_00000.json"
    state.write_text(state.read_text().replace("0", "9"))      # same size, other bytes
    consolidate(str(ckpt), tmp_path / "plain", progress=False)  # reads only the export: passes
    with pytest.raises(CheckpointError, match=r"1 of \d+ files corrupt.*state/rank_00000.json: sha256"):
        consolidate(str(ckpt), tmp_path / "deep", progress=False, verify=True)
    assert not (tmp_path / "deep").exists()
    cli = subprocess.run([sys.executable, "-m", "ckf_dist.cli", "--quiet", "consolidate", str(ckpt),
                          "--out", str(tmp_path / "cli"), "--verify"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.count("\n") == 1 and "state/rank_00000.json" in cli.stderr


def test_consolidate_backbone_mismatch(prepared_dataset, tmp_path):
    make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, config_backbone="tiny-gpt2")
    with pytest.raises(CheckpointError, match="backbone mismatch"):
        consolidate(str(tmp_path / "ckpts" / "ckpt-run"), tmp_path / "out", progress=False)


def test_consolidate_from_zero_shards_without_export(prepared_dataset, tmp_path):
    """No export/: the ZeRO-2 shards go through DeepSpeed's own zero_to_fp32."""
    pytest.importorskip("deepspeed")
    ref, model = make_checkpoint(str(tmp_path / "ckpts"), prepared_dataset, export=False, zero_shards=True)
    assert not any(f.startswith("export/") for f in ref.manifest["files"])
    out = consolidate(ref.url, tmp_path / "out", progress=False)
    assert json.loads((out / "ckf_meta.json").read_text())["source"] == "zero_shards"
    trainable = load_file(str(out / "trainable.safetensors"))
    own = model.trainable_state_dict()
    assert set(trainable) == set(own)
    for k in own:
        torch.testing.assert_close(trainable[k], own[k].float(), rtol=0, atol=0, msg=k)


def test_adapters_name_the_backbone_by_its_id_when_given(tmp_path):
    """model.backbone_id (the presets set the hub id) is what peft's base_model_name_or_path says;
    without it a local folder is named by its absolute path."""
    from ckf_dist.model import ModelConfig
    from ckf_dist.stages.consolidate import backbone_name

    folder = tmp_path / "Llama-2-7b-hf"
    assert backbone_name(ModelConfig(backbone=str(folder), backbone_id="meta-llama/Llama-2-7b-hf")) == \
        "meta-llama/Llama-2-7b-hf"
    assert backbone_name(ModelConfig(backbone=str(folder))) == str(folder.resolve())
    assert backbone_name(ModelConfig(backbone="tiny-llama")) == "tiny-llama"
