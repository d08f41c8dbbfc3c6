"""Frozen causal-LM backbones: the per-family registry and the loader.

What differs between model families lives in :data:`FAMILIES` (one row per ``model_type``):
which modules play the attention roles q/k/v/o, whether q/k/v are one fused projection
(and how its output is laid out), and how to build a tiny random config for tests.

:func:`load_backbone` gives ``(model, tokenizer)`` for the embedded SmolLM2-135M (a GGUF
file converted once to a cached safetensors folder), any local Hugging Face folder of a
registered family, or a ``tiny-<family>`` random model. Nothing is ever downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ckf_dist import resources, storage
from ckf_dist.errors import ModelError
from ckf_dist.model.config import ModelConfig

ROLES = ("q", "k", "v", "o")
TINY_HIDDEN = 64
TINY_LAYERS = 2
SMOLLM2_VOCAB = 49152   # the SmolLM2 tokenizer's vocabulary: tiny backbones share it so shards work


def _split_contiguous(config, role: str) -> torch.Tensor:
    """GPT-2 ``c_attn``: output is [q | k | v], each ``hidden`` wide (``split(hidden, dim=2)``)."""
    h = config.hidden_size
    j = "qkv".index(role)
    return torch.arange(j * h, (j + 1) * h)


def _split_per_head(config, role: str) -> torch.Tensor:
    """GPT-NeoX ``query_key_value``: output viewed as [heads, 3 * head_dim], then chunked into q, k, v."""
    nh = config.num_attention_heads
    hd = config.hidden_size // nh
    j = "qkv".index(role)
    return torch.cat([torch.arange(h * 3 * hd + j * hd, h * 3 * hd + (j + 1) * hd) for h in range(nh)])


@dataclass(frozen=True)
class Family:
    """How one model family names its attention projections and how to build a tiny one."""

    roles: dict[str, str]                         # role -> module-name suffix
    tiny_config: Callable[[], object]             # a small random config (vocab of the SmolLM2 tokenizer)
    fused_split: Callable[[object, str], torch.Tensor] | None = None   # role -> output indices of a fused qkv
    conv1d: bool = False                          # weights stored [in, out] (GPT-2 Conv1D; peft fan_in_fan_out)

    def module_for(self, role: str) -> str:
        """The module-name suffix of ``role``; a target that is no role is taken as a suffix itself."""
        return self.roles.get(role, role)

    def out_index(self, config, role: str) -> torch.Tensor | None:
        """Output indices that ``role`` owns in its module (None: the whole output)."""
        if role in ("q", "k", "v") and self.fused_split is not None:
            return self.fused_split(config, role)
        return None


def _llama_like(cls_name: str, **extra) -> Callable[[], object]:
    def build():
        import transformers

        cls = getattr(transformers, cls_name)
        return cls(vocab_size=SMOLLM2_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
                   num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                   pad_token_id=2, **extra)
    return build


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=SMOLLM2_VOCAB, n_embd=TINY_HIDDEN, n_layer=TINY_LAYERS, n_head=4, n_positions=512,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)


def _tiny_gptneox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=SMOLLM2_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=2 * TINY_HIDDEN,
                         num_hidden_layers=TINY_LAYERS, num_attention_heads=4, max_position_embeddings=512,
                         attention_dropout=0.0, hidden_dropout=0.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)


_LLAMA_ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}

FAMILIES: dict[str, Family] = {
    "llama": Family(_LLAMA_ROLES, _llama_like("LlamaConfig")),
    "mistral": Family(_LLAMA_ROLES, _llama_like("MistralConfig")),
    "qwen2": Family(_LLAMA_ROLES, _llama_like("Qwen2Config")),
    "gpt2": Family({"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj"},
                   _tiny_gpt2, fused_split=_split_contiguous, conv1d=True),
    "gpt_neox": Family({"q": "attention.query_key_value", "k": "attention.query_key_value",
                        "v": "attention.query_key_value", "o": "attention.dense"},
                       _tiny_gptneox, fused_split=_split_per_head),
}
TINY_NAMES = {"tiny-llama": "llama", "tiny-mistral": "mistral", "tiny-qwen2": "qwen2",
              "tiny-gpt2": "gpt2", "tiny-gptneox": "gpt_neox"}


class BackboneNotFoundError(ModelError, FileNotFoundError):
    """``model.backbone`` names no loadable folder (models are never downloaded)."""


def family_row(model_type: str | None, source: str = "backbone") -> Family:
    """The registry row of a ``model_type``; an unregistered family is a clear error naming ``source``."""
    if model_type not in FAMILIES:
        raise ModelError(f"{source}: family {model_type!r} is not registered; supported: {sorted(FAMILIES)} "
                         "(add a row to ckf_dist.model.backbone.FAMILIES: its q/k/v/o module names)")
    return FAMILIES[model_type]


def family_of(model: nn.Module) -> Family:
    """The registry row of a loaded backbone; an unregistered family is a clear error."""
    return family_row(getattr(getattr(model, "config", None), "model_type", None))


def backbone_folder(name: str) -> Path:
    """``model.backbone`` as a local Hugging Face folder; :class:`BackboneNotFoundError` when it is none."""
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise BackboneNotFoundError(
            f"model.backbone: {name!r} is not 'smollm2', not one of {sorted(TINY_NAMES)}, and not a local "
            "folder with config.json (models are never downloaded; save one with save_pretrained first)")
    return folder


def folder_tokenizer(folder: Path, cache: str = ""):
    """The tokenizer saved in a backbone folder, else the embedded SmolLM2 one."""
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return resources.load_tokenizer("smollm2", cache)


def tiny_backbone(family: str, seed: int = 0) -> nn.Module:
    """A small random causal LM of a registered family (hidden 64, 2 layers, SmolLM2 vocabulary)."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ModelError(f"tiny backbone: unknown family {family!r}; known: {sorted(FAMILIES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family].tiny_config())
    return model.float()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF file once and save it as a plain fp32 safetensors folder (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the same config.
    conf = loaded.config.to_dict()
    conf.pop("quantization_config", None)
    plain_config = AutoConfig.for_model(**{k: v for k, v in conf.items() if k != "model_type"},
                                        model_type=conf["model_type"])
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in ("lm_head.weight",)]   # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"{gguf}: GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    # Written by hand, not with save_pretrained: under a torch.distributed group that writes only
    # on rank 0, and every rank (any node) may be the one that converts into its own cache.
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
    if getattr(plain.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)          # tied to the input embedding, re-tied at load
    with storage.atomic_dir(target, replace=False, validate=check_backbone_folder) as tmp:
        plain.config.save_pretrained(tmp)
        write_portable_config(tmp / "config.json")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})


def portable_config(conf: dict) -> dict:
    """``config.json`` contents that every transformers version ``pyproject.toml`` allows reads alike.

    transformers 5 writes RoPE as ``rope_parameters`` only and the dtype as ``dtype``; 4.x reads
    ``rope_theta`` (default 1e4: SmolLM2's 1e5 would be lost, logits off silently), ``rope_scaling``
    and ``torch_dtype``. The legacy keys are added with the same values; 5.x ignores or accepts them.
    """
    out = dict(conf)
    rope = conf.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
            out.setdefault("rope_scaling", dict(scaling, type=scaling["rope_type"]))
    if "dtype" in conf:
        out.setdefault("torch_dtype", conf["dtype"])
    return out


def write_portable_config(path: Path) -> bool:
    """Add the legacy keys of :func:`portable_config` to a ``config.json`` in place; True when it changed."""
    import json

    conf = json.loads(path.read_text())
    fixed = portable_config(conf)
    if fixed == conf:
        return False
    with storage.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")
    return True


def check_backbone_folder(folder: Path) -> None:
    """A converted folder must name its model type and hold its weights before it goes into the cache."""
    import json

    conf = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if not conf.get("model_type") or not (folder / "model.safetensors").is_file():
        raise RuntimeError(f"{folder}: conversion produced no config.json with model_type or no model.safetensors")


def smollm2_folder(cache: str = "") -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converting the embedded GGUF on first use."""
    import json

    target = resources.cache_dir(cache) / "smollm2-135m-instruct"
    config = target / "config.json"
    if config.is_file():
        conf = json.loads(config.read_text())
        if conf == portable_config(conf):
            return target
    with storage.file_lock(target.with_name(target.name + ".lock")):   # one converter per machine
        if not config.is_file():
            started = time.time()
            _convert_gguf(resources.smollm2_gguf(), target)
            print(f"[ckf] converted SmolLM2 GGUF to {target} in {time.time() - started:.0f}s (one time)", flush=True)
        elif write_portable_config(config):      # a cache converted before the legacy keys were written
            print(f"[ckf] added transformers-4 keys (rope_theta, torch_dtype) to {config}", flush=True)
    return target


def preflight_backbone(cfg: ModelConfig):
    """Check ``model.backbone`` without loading weights; returns the tokenizer it will use.

    Run by the driver before any worker starts, so a missing folder, an unregistered family
    or a missing embedded model is a clear error in seconds rather than after the cluster and
    DeepSpeed have started (each worker would otherwise fail the same way).
    """
    import json

    name = cfg.backbone
    if name in TINY_NAMES:
        return resources.load_tokenizer("smollm2", cfg.cache_dir)
    if name == "smollm2":
        resources.smollm2_gguf()                           # the embedded model's package is installed
        return resources.load_tokenizer("smollm2", cfg.cache_dir)
    folder = backbone_folder(name)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'config.json'}: not readable JSON ({exc})") from None
    family_row(model_type, f"model.backbone {name!r}")
    return folder_tokenizer(folder, cfg.cache_dir)


def load_backbone(cfg: ModelConfig, zero3_config: dict | None = None):
    """Load the frozen backbone and its tokenizer: ``(model, tokenizer)``.

    With ``zero3_config`` (a DeepSpeed ZeRO-3 config dict) every parameter is partitioned across
    the ranks *as it is created or loaded* (transformers' DeepSpeed integration wraps the
    construction in ``deepspeed.zero.Init``), so no rank ever holds the whole backbone: the
    path for backbones larger than one GPU. The weights are created in ``cfg.dtype`` directly
    (a partitioned parameter cannot be cast afterwards).

    ``cfg.backbone`` is ``"smollm2"``, a local Hugging Face folder, or ``"tiny-<family>"``.
    All parameters are frozen and cast to ``cfg.dtype``; gradient checkpointing is switched on
    later by :func:`ckf_dist.model.ckf.build_ckf_model` (it needs the routing context).
    """
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    name = cfg.backbone
    if zero3_config is not None:
        return _load_partitioned(cfg, dtype, zero3_config)
    if name in TINY_NAMES:
        model = tiny_backbone(TINY_NAMES[name])
        tokenizer = resources.load_tokenizer("smollm2", cfg.cache_dir)
    elif name == "smollm2":
        folder = smollm2_folder(cfg.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = resources.load_tokenizer("smollm2", cfg.cache_dir)
    else:
        folder = backbone_folder(name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = folder_tokenizer(folder, cfg.cache_dir)
    family_of(model)                     # refuse unregistered families up front
    model.to(dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, tokenizer


def _load_partitioned(cfg: ModelConfig, dtype: torch.dtype, zero3_config: dict):
    """``load_backbone`` under ZeRO-3: parameters partitioned at creation (see its docstring)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if zero3_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_backbone: zero3_config must be a DeepSpeed config with zero_optimization.stage = 3")
    name = cfg.backbone
    # a random init under zero.Init draws other numbers than the plain one, so a ZeRO-3 run would
    # train another backbone than a ZeRO-2 run of the same config: the partitioned tiny model takes
    # the plain load's seeded weights, built before partitioning starts (tiny: every rank builds it)
    reference = tiny_backbone(TINY_NAMES[name]).to(dtype) if name in TINY_NAMES else None
    hf_ds = HfDeepSpeedConfig(zero3_config)      # transformers partitions while this object lives
    if reference is not None:
        import deepspeed

        model = AutoModelForCausalLM.from_config(reference.config, dtype=dtype)
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(reference.state_dict())
        tokenizer = resources.load_tokenizer("smollm2", cfg.cache_dir)
    else:
        folder = smollm2_folder(cfg.cache_dir) if name == "smollm2" else backbone_folder(name)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = folder_tokenizer(folder, cfg.cache_dir)
    family_of(model)
    model.requires_grad_(False)
    model.config.use_cache = False
    model._ckf_hf_ds_config = hf_ds               # keep the integration on for this model's lifetime
    return model, tokenizer
