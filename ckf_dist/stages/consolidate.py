"""``ckf consolidate``: a committed checkpoint on any fsspec URL -> standard artifacts.

Output folder::

    bridge.safetensors            the bridge (MetaNet, Map_U, Map_V), names as in ``Bridge.state_dict()``
    adapters/<task>/              one plain peft LoRA folder per task (shared + task adapter merged)
    trainable.safetensors         the whole CKF trainable state (what ``ckf evaluate`` reloads)
    tokenizer/                    the tokenizer the dataset was prepared with (AutoTokenizer loads it)
    backbone/                     with ``--with-backbone``: the frozen backbone and its tokenizer; the
                                  adapters then name it as ``backbone`` (relative to this folder)
    ckf_meta.json                 backbone, tokenizer fingerprint, step, metrics, dataset, tasks
    config.yaml, metrics.jsonl    the run's config and training log

Only what is needed is read: the gathered 16-bit export when the checkpoint has one, else
the ZeRO shards through DeepSpeed's own ``zero_to_fp32``. Every fetched file is sha256-checked
against the manifest; every listed file must exist with its recorded size; ``--verify`` hashes
every listed file (a shard corrupted at the same size is otherwise only found on resume).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ckf_dist.checkpoint import store
from ckf_dist.checkpoint.store import CheckpointError
from ckf_dist.contract import BRIDGE_FILE, CHECKPOINT_EXPORT, CONSOLIDATED_META, N_TASKS, TRAINABLE_FILE
from ckf_dist.progress import log



def _zero_to_fp32(ds_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 trainable tensors from DeepSpeed ZeRO shards (DeepSpeed's own converter)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{ds_dir}: DeepSpeed zero_to_fp32 could not read the ZeRO shards ({exc})") from None
    return {k: v for k, v in state.items()}


def read_trainable_state(ref: store.CheckpointRef, local: Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """The trainable state of a committed checkpoint: the export when present, else the ZeRO shards."""
    from safetensors.torch import load_file

    files = ref.manifest.get("files", {})
    if CHECKPOINT_EXPORT in files:
        store.fetch(ref, [CHECKPOINT_EXPORT], local)
        log(progress, f"  read {CHECKPOINT_EXPORT} ({files[CHECKPOINT_EXPORT]['bytes'] / 1e6:.1f} MB, sha256 ok)")
        return load_file(str(local / CHECKPOINT_EXPORT))
    shards = sorted(f for f in files if f.startswith("ds/"))
    if not shards:
        raise CheckpointError(f"{ref.url}: neither {CHECKPOINT_EXPORT} nor ZeRO shards (ds/...) in its manifest")
    store.fetch(ref, shards, local)
    log(progress, f"  no {CHECKPOINT_EXPORT}: read {len(shards)} ZeRO files through deepspeed zero_to_fp32 (sha256 ok)")
    return _zero_to_fp32(local / "ds", store.step_dir_name(ref.step))


def run_config(ref: store.CheckpointRef, local: Path):
    """The run's resolved config (config.yaml, else the manifest's copy)."""
    from ckf_dist.config import config_from_dict, load_config

    if "config.yaml" in ref.manifest.get("files", {}):
        store.fetch(ref, ["config.yaml"], local)
        return load_config(local / "config.yaml")
    if "config" in ref.manifest:
        return config_from_dict(ref.manifest["config"], f"{ref.url}/manifest.json")
    raise CheckpointError(f"{ref.url}: no config.yaml and no config in the manifest")


def n_tasks_of(state: dict[str, torch.Tensor], default: int = N_TASKS) -> int:
    """Number of task adapters in a trainable state (leading dim of any ``lora_task_A``)."""
    for name, t in state.items():
        if name.endswith("lora_task_A"):
            return int(t.shape[0])
    return default


def backbone_name(model_cfg) -> str:
    """What peft's ``base_model_name_or_path`` should say: ``model.backbone_id`` when set (portable:
    the model's id), else a loadable folder on this machine."""
    from ckf_dist.model.backbone import TINY_NAMES, smollm2_folder

    if model_cfg.backbone_id:
        return model_cfg.backbone_id
    if model_cfg.backbone in TINY_NAMES:
        return model_cfg.backbone
    if model_cfg.backbone == "smollm2":
        return str(smollm2_folder(model_cfg.cache_dir))
    return str(Path(model_cfg.backbone).resolve())


BACKBONE_DIR = "backbone"


def _backbone_files(folder: Path) -> list[Path]:
    """What of a Hugging Face model folder is the model: configs, weights, their index, tokenizer files."""
    keep = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja", ".py")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.endswith(keep))


def export_backbone(model_cfg, tokenizer, out: Path, progress: bool = False) -> Path:
    """The frozen backbone, readable by plain transformers, into ``out/backbone`` with the dataset's
    tokenizer beside it; written to a temp folder and renamed into place whole.

    A folder backbone (``smollm2``'s converted cache, a local folder) is copied file by file;
    a tiny test backbone is written from its seeded construction. ``config.json`` gets the
    legacy keys every allowed transformers version reads (:func:`portable_config`)."""
    from ckf_dist import storage
    from ckf_dist.model.backbone import (TINY_NAMES, check_backbone_folder, backbone_folder, smollm2_folder,
                                         tiny_backbone, write_portable_config)

    target = out / BACKBONE_DIR
    with storage.atomic_dir(target, replace=True, validate=check_backbone_folder) as tmp:
        if model_cfg.backbone in TINY_NAMES:
            tiny_backbone(TINY_NAMES[model_cfg.backbone]).save_pretrained(tmp)
        else:
            src = (smollm2_folder(model_cfg.cache_dir) if model_cfg.backbone == "smollm2"
                   else backbone_folder(model_cfg.backbone))
            files = _backbone_files(src)
            for f in files:
                shutil.copyfile(f, tmp / f.name)
            log(progress, f"  copied the backbone {src} ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB, "
                           f"{len(files)} files)")
        write_portable_config(tmp / "config.json")
        tokenizer.save_pretrained(str(tmp))
    return target


def rebuild_model(model_cfg, state: dict[str, torch.Tensor], cf_user=None, cf_item=None, tokenizer_info=None,
                  where: str = "checkpoint"):
    """Backbone named in the config + Multi-LoRA + bridge, with ``state`` loaded; ``(model, tokenizer)``.

    Without CF tables the bridge gets one-row placeholders (its weights do not depend on the table
    sizes; enough for export). Names or shapes that do not fit the rebuilt model, or a tokenizer
    other than the dataset's, are a :class:`CheckpointError` (backbone mismatch).
    """
    from ckf_dist.model import build_ckf_model, load_backbone

    backbone, tokenizer = load_backbone(model_cfg)
    if tokenizer_info:
        from ckf_dist.resources import tokenizer_fingerprint

        got = tokenizer_fingerprint(tokenizer)
        if got != tokenizer_info.get("fingerprint"):
            raise CheckpointError(f"{where}: backbone mismatch: the run's dataset was tokenized with fingerprint "
                                  f"{tokenizer_info.get('fingerprint')}, backbone {model_cfg.backbone!r} has {got}")
    if cf_user is None:
        d = next((t.shape[1] for n, t in state.items() if n == "bridge.map_u.weight"), 8)
        cf_user = cf_item = torch.zeros(1, d)
    model = build_ckf_model(model_cfg, backbone, cf_user, cf_item, n_tasks=n_tasks_of(state))
    dtype = backbone.get_input_embeddings().weight.dtype
    try:
        model.load_trainable_state_dict({k: v.to(dtype) for k, v in state.items()})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{where}: backbone mismatch: the trainable weights do not fit backbone "
                              f"{model_cfg.backbone!r} rebuilt from the run config: {exc}") from None
    return model.eval(), tokenizer


def consolidate(ckpt_url: str, out_dir: str | Path, progress: bool = True, verify: bool = False,
                with_backbone: bool = False) -> Path:
    """Committed checkpoint (or run folder: its latest) -> bridge, per-task peft adapters, metadata. Returns out_dir.

    ``verify`` hashes every file of the checkpoint first (ZeRO shards and resume state too, not
    only the export it reads), so a checkpoint kept for resuming is known to be whole.
    ``with_backbone`` writes the backbone and its tokenizer into ``out_dir/backbone`` and names it
    there (``base_model_name_or_path: backbone``, relative to ``out_dir``), so the folder is whole
    on any machine; without it the adapters name ``model.backbone_id`` or the backbone's folder."""
    from safetensors.torch import save_file

    from ckf_dist.config import dump_config

    started = time.perf_counter()
    ref = store.resolve_checkpoint(ckpt_url)
    log(progress, f"consolidate: {ref.url} (step {ref.step}/{ref.manifest.get('total_steps', '?')}, "
                   f"{len(ref.manifest.get('files', {}))} files)")
    checked = store.verify(ref, deep=verify, progress=progress)   # every listed file present with its size
    if verify:
        log(progress, f"  verified sha256 of all {checked} files [{time.perf_counter() - started:.1f}s]")
    out = Path(out_dir)
    local = Path(tempfile.mkdtemp(prefix="ckf-consolidate-"))
    try:
        cfg = run_config(ref, local)
        state = read_trainable_state(ref, local, progress)
        dataset = ref.manifest.get("dataset", {})
        model, tokenizer = rebuild_model(cfg.model, state, tokenizer_info=dataset.get("tokenizer"), where=ref.url)
        log(progress, f"  rebuilt {cfg.model.backbone} + {len(state)} trainable tensors [{time.perf_counter() - started:.1f}s]")
        has_log = "metrics.jsonl" in ref.manifest.get("files", {})
        if has_log:
            store.fetch(ref, ["metrics.jsonl"], local)
        out.mkdir(parents=True, exist_ok=True)
        base = backbone_name(cfg.model)
        if with_backbone:
            export_backbone(cfg.model, tokenizer, out, progress)
            base = BACKBONE_DIR
        folders = model.export_peft(out / "adapters", base)
        trainable = {k: v.detach().float().contiguous() for k, v in model.trainable_state_dict().items()}
        bridge = {k[len("bridge."):]: v for k, v in trainable.items() if k.startswith("bridge.")}
        if bridge:
            save_file(bridge, str(out / BRIDGE_FILE), metadata={"format": "ckf-bridge"})
        save_file(trainable, str(out / TRAINABLE_FILE), metadata={"format": "ckf-trainable", "n_tasks": str(model.n_tasks)})
        (out / "config.yaml").write_text(dump_config(cfg))
        tokenizer.save_pretrained(str(out / "tokenizer"))      # the dataset's tokenizer, beside the adapters
        if has_log:
            shutil.copyfile(local / "metrics.jsonl", out / "metrics.jsonl")
        meta = {
            "format": "ckf-consolidated", "schema": 1, "checkpoint": ref.url, "step": ref.step,
            "total_steps": ref.manifest.get("total_steps"), "run_name": ref.manifest.get("run_name", cfg.run_name),
            "backbone": cfg.model.backbone, "base_model_name_or_path": base, "dtype": cfg.model.dtype,
            "backbone_dir": BACKBONE_DIR if with_backbone else None,
            "tokenizer": dataset.get("tokenizer", {}), "tokenizer_dir": "tokenizer", "dataset": dataset.get("url", cfg.data.output),
            "answer_tokens": dataset.get("answer_tokens", {}), "dataset_fingerprint": dataset.get("fingerprint"),
            "tasks": list(folders),
            "n_tasks": model.n_tasks, "has_bridge": bool(bridge), "metrics": ref.manifest.get("metrics", {}),
            "source": "export" if CHECKPOINT_EXPORT in ref.manifest.get("files", {}) else "zero_shards",
            "export_dtype": ref.manifest.get("export_dtype"), "world_size": ref.manifest.get("world_size"),
            "zero_stage": ref.manifest.get("zero_stage"), "versions": ref.manifest.get("versions", {}),
        }
        (out / CONSOLIDATED_META).write_text(json.dumps(meta, indent=1) + "\n")
    finally:
        shutil.rmtree(local, ignore_errors=True)
    log(progress, f"  wrote {BRIDGE_FILE}, adapters/{{{','.join(folders)}}}, {CONSOLIDATED_META} to {out} "
                   f"[{time.perf_counter() - started:.1f}s]")
    return out


def load_consolidated(folder: str | Path, model_cfg=None, cf_user=None, cf_item=None):
    """``(model, tokenizer, meta)`` from a consolidated folder; ``model_cfg`` defaults to its config.yaml."""
    from safetensors.torch import load_file

    from ckf_dist.config import load_config

    folder = Path(folder)
    if not (folder / CONSOLIDATED_META).is_file():
        raise CheckpointError(f"{folder}: no {CONSOLIDATED_META}; not a consolidated run (run `ckf consolidate` first)")
    meta = json.loads((folder / CONSOLIDATED_META).read_text())
    if model_cfg is None:
        model_cfg = load_config(folder / "config.yaml").model
    state = load_file(str(folder / TRAINABLE_FILE))
    model, tokenizer = rebuild_model(model_cfg, state, cf_user, cf_item, meta.get("tokenizer"), where=str(folder))
    return model, tokenizer, meta
