"""Per-GPU memory of a CKF training run, predicted from its config (``ckf plan``).

The parameter counts are exact: the backbone is built from its ``config.json`` on the meta
device (no weights read, no memory used) and the CKF parts (Multi-LoRA, bridge, CF tables)
are added to it exactly as training adds them. Everything else is arithmetic on those
counts and the run's shapes, per GPU, in bytes:

- **frozen**: the backbone's weights (and the CF tables), ``dtype`` bytes each; divided by the
  number of GPUs under ZeRO-3 only;
- **trainable / grads / fp32 masters / AdamW moments**: 2 (bf16) or 4, 2 or 4, 4 and 8 bytes
  per trainable parameter; ZeRO-1 partitions the masters and moments over the GPUs, ZeRO-2 the
  gradients too, ZeRO-3 also the trainable weights;
- **buffers**: ZeRO-2's gradient bucket (``reduce_bucket_size`` elements, sized to the trainable
  set by :func:`ckf_dist.train.deepspeed_config.build_deepspeed_config`), ZeRO-3's gathered layer and the
  prefetch bucket (``stage3_prefetch_bucket_size``, 5e7 elements);
- **activations**, per stream (text and CF; both are alive at the backward) for a micro-batch of
  ``B`` rows of ``L`` tokens: what autograd keeps per decoder layer and token, counted tensor by
  tensor. A frozen projection keeps nothing for its backward (its input gradient needs only its
  weight), so a Llama-style layer keeps its two norm inputs, q/k/v after RoPE and the attention
  output (SDPA's backward), the norm output and the attention output once more when q/k/v and
  o carry LoRA (their shrink needs them), and the MLP's gate, activated gate and up outputs:
  ``(4h + 2kv + [h] + [h] + 3i) x dtype`` bytes (``h`` hidden, ``kv`` the key/value width, ``i``
  the MLP width; ``i`` for an MLP without gate), plus a dropped copy and a 1-byte mask of each
  LoRA input when ``lora.dropout > 0``. Attention is O(L) per row (SDPA's flash or
  memory-efficient kernels, on CPU too), but the padded batch's ``B x L x L`` boolean mask is
  built once per stream. The LM head runs on answer positions only: ``B x answer x vocab`` fp32
  logits and their log-softmax. Without checkpointing the peak is all of it at the end of the
  forward; with gradient checkpointing each layer keeps only its input, and the peak is the
  larger of the forward's end (logits alive) and one layer recomputed in the backward.

Checked against the tensor bytes measured during a real training step (tests/test_plan.py):
the parameter side is exact, and the activation side is a per-tensor count of what the
step holds at its peak.

What it leaves out: the CUDA context and allocator fragmentation (``ckf plan`` reports them as
a stated margin), and kernel workspaces that live inside one op.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckf_dist.errors import ModelError
from ckf_dist.train.deepspeed_config import DEEPSPEED_BUCKET

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ZERO3_PREFETCH = 50_000_000             # DeepSpeed's default stage3_prefetch_bucket_size, in elements

# Architectures of the presets' backbones by hub id (their public config.json), for planning
# on a machine without the weights; a local folder's config.json always wins.
KNOWN_BACKBONES = {
    "meta-llama/Llama-2-7b-hf": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
    "meta-llama/Llama-2-70b-hf": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                                      num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)),
    "meta-llama/Meta-Llama-3-8B": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "Qwen/Qwen2.5-7B": ("Qwen2Config", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                            tie_word_embeddings=False)),
}


def backbone_config(model_cfg):
    """The backbone's transformers config, without its weights: a tiny family's, the embedded
    SmolLM2's (from the GGUF header), a local folder's ``config.json``, else a known hub id's."""
    import transformers

    from ckf_dist import resources
    from ckf_dist.model.backbone import FAMILIES, TINY_NAMES

    name = model_cfg.backbone
    if name in TINY_NAMES:
        return FAMILIES[TINY_NAMES[name]].tiny_config()
    if name == "smollm2":
        folder = resources.cache_dir(model_cfg.cache_dir) / "smollm2-135m-instruct"      # converted already?
        if (folder / "config.json").is_file():
            return transformers.AutoConfig.from_pretrained(folder)
        gguf = resources.smollm2_gguf()
        return transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from pathlib import Path

    if (Path(name) / "config.json").is_file():
        return transformers.AutoConfig.from_pretrained(name)
    known = KNOWN_BACKBONES.get(model_cfg.backbone_id)
    if known is None:
        raise ModelError(f"model.backbone: {name!r} has no config.json here and model.backbone_id "
                         f"{model_cfg.backbone_id!r} is not one of {sorted(KNOWN_BACKBONES)}; plan on a machine with "
                         f"the backbone folder (only its config.json is read)")
    cls, shape = known
    return getattr(transformers, cls)(**shape)


@dataclass
class ModelCounts:
    """Element counts of a CKF model (exact) and the backbone shapes the activations need."""

    trainable: int
    frozen: int              # backbone weights and buffers (the CF tables included)
    largest_layer: int       # frozen elements of the largest decoder layer (ZeRO-3 gathers one at a time)
    hidden: int
    kv: int                  # key/value projection width
    intermediate: int
    gated: bool              # gated MLP (Llama, Qwen2, Mistral) or plain (GPT-2, GPT-NeoX)
    layers: int
    heads: int
    vocab: int
    lora_inputs: int         # summed input width of the LoRA-targeted projections of one layer


def count_model(cfg, n_users: int, n_items: int) -> ModelCounts:
    """Build the CKF model of ``cfg`` on the meta device and count it."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from ckf_dist.model import build_ckf_model
    from ckf_dist.model.backbone import family_row
    from ckf_dist.model.multi_lora import MultiLoraLinear

    config = backbone_config(cfg.model)
    family_row(getattr(config, "model_type", None), f"model.backbone {cfg.model.backbone!r}")
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.bridge.slot_scale = "default"          # the counts do not depend on how slots are scaled
    model_cfg.gradient_checkpointing = False
    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(config)
        d = cfg.cf.table_dim()
        model = build_ckf_model(model_cfg, backbone.requires_grad_(False),
                                torch.zeros(max(n_users, 1), d), torch.zeros(max(n_items, 1), d))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for b in model.buffers())
    layers = _decoder_layers(model)
    largest = max((sum(p.numel() for p in layer.parameters() if not p.requires_grad) for layer in layers), default=0)
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    gated = getattr(config, "model_type", "") in ("llama", "mistral", "qwen2")
    lora_inputs = sum(m.base.in_features if hasattr(m.base, "in_features") else m.base.weight.shape[0]
                      for m in layers[0].modules() if isinstance(m, MultiLoraLinear)) if layers else 0
    return ModelCounts(trainable=trainable, frozen=frozen, largest_layer=largest, hidden=h, kv=h // heads * kv,
                       intermediate=inter, gated=gated, layers=len(layers), heads=heads,
                       vocab=config.vocab_size, lora_inputs=lora_inputs)


def _decoder_layers(model) -> list:
    import torch

    best: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            best = list(module)
    return best


@dataclass
class Shape:
    """What one training step holds: rows per micro-batch, tokens per row (padded), answer tokens
    per row (on average over the micro-batch; the plan takes the longest an answer can be)."""

    micro_batch: int
    length: int
    answer: float
    streams: int = 2          # text and CF (1 for the text-only variant)


def estimate(counts: ModelCounts, cfg, gpus: int, shape: Shape) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring); ``total`` is their sum."""
    z = cfg.train.zero_stage
    b = DTYPE_BYTES[cfg.model.dtype]
    part = lambda stage: gpus if z >= stage else 1          # noqa: E731  (partitioned from this stage on)
    out: dict[str, float] = {}
    out["frozen weights"] = counts.frozen * b / part(3)
    out["trainable weights"] = counts.trainable * b / part(3)
    out["gradients"] = counts.trainable * b / part(2)
    out["fp32 masters"] = counts.trainable * 4 / part(1) if (z >= 1 or b != 4) else 0.0
    out["AdamW moments"] = counts.trainable * 8 / part(1)
    buffers = 0.0
    if z == 2:
        buffers += min(DEEPSPEED_BUCKET, counts.trainable) * b
    if z == 3:
        buffers += (counts.largest_layer + min(ZERO3_PREFETCH, counts.largest_layer)) * b
    out["ZeRO buffers"] = buffers
    out["activations"] = activation_bytes(counts, cfg, shape)
    out["total"] = sum(out.values())
    return out


def activation_bytes(counts: ModelCounts, cfg, shape: Shape) -> float:
    """Bytes of activations kept for the backward of one micro-batch (all its streams) at its peak."""
    b = DTYPE_BYTES[cfg.model.dtype]
    h, kv, i = counts.hidden, counts.kv, counts.intermediate
    targets = set(cfg.model.lora.shared_targets) | set(cfg.model.lora.task_targets)
    tokens = shape.micro_batch * shape.length
    per_token = 4 * h + 2 * kv + h * bool(targets & {"q", "k", "v"}) + h * ("o" in targets)
    per_token += 3 * i if counts.gated else i
    per_token *= b
    if cfg.model.lora.dropout > 0:                 # the dropped input (dtype) and its 1-byte mask
        per_token += counts.lora_inputs * (b + 1)
    layer = tokens * per_token                     # one layer, one stream
    mask = shape.micro_batch * shape.length ** 2   # bool
    logits = 2 * shape.micro_batch * shape.answer * counts.vocab * 4
    streams = range(shape.streams)
    edges = sum(tokens * h * b * (2 if s else 1) for s in streams)   # final-norm input (+ the CF stream's
    #                                                                  embeddings with slots written in)
    if not cfg.model.gradient_checkpointing:
        return shape.streams * (counts.layers * layer + mask + logits) + edges
    kept = shape.streams * (counts.layers * tokens * h * b + mask) + edges
    return kept + max(shape.streams * logits, layer + 2 * tokens * h * b)


def largest_micro_batch(counts: ModelCounts, cfg, gpus: int, shape: Shape, budget: float, limit: int = 4096) -> int:
    """The largest micro-batch whose estimate fits in ``budget`` bytes (0: not even one row)."""
    fits = lambda m: estimate(counts, cfg, gpus,  # noqa: E731
                              Shape(m, shape.length, shape.answer, shape.streams))["total"] <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def answer_tokens(cfg) -> int:
    """The longest answer a row of the config's tasks can have, in tokens (with its end token)."""
    return max(cfg.data.max_review_tokens + 1, 8) if cfg.data.task_weights.get("review", 0) > 0 else 8


def gib(n: float) -> str:
    return f"{n / GiB:.2f}" if n < 100 * GiB else f"{n / GiB:.0f}"

