"""CKFModel: frozen backbone + Multi-LoRA + bridge, and the two-stream curriculum objective.

docs/method.md, "Training objective":

    L_text = CE on answer tokens of the text-only prompts      (trains the LoRA adapters)
    L_cf   = CE on answer tokens of the CF-slot prompts         (trains the bridge; LoRA constant)
    w(t)   = 1 / (1 + exp(8 (t - T/2) / (T/2)))                 (5)
    loss   = w(t) * L_text + (1 - w(t)) * L_cf                  (6)

``mode="joint"`` lets both streams train every trainable parameter (ablation).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ckf_dist.contract import IGNORE_INDEX, SLOT_KEYS, TASKS
from ckf_dist.model.backbone import family_of
from ckf_dist.model.bridge import Bridge
from ckf_dist.model.config import ModelConfig
from ckf_dist.model.multi_lora import LoraRouting, MultiLoraLinear, inject_multi_lora, multi_lora_layers

MODES = ("two_stream", "joint")
CURRICULA = ("loss", "lr", "none")
LOSS_NORMS = ("token", "sample")


def output_cache(output):
    """The key/value cache a body returned (``cache`` in transformers >= 5.x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def curriculum_weight(step: int, total_steps: int) -> float:
    """w(t) of eq. (5): close to 1 at t = 0 (text first), 0.5 at T/2, close to 0 at t = T."""
    if total_steps <= 0:
        raise ValueError(f"total_steps: must be > 0, got {total_steps}")
    half = total_steps / 2
    return 1.0 / (1.0 + math.exp(8.0 * (step - half) / half))


class CKFModel(nn.Module):
    """The trainable CKF model; build it with :func:`build_ckf_model`."""

    def __init__(self, cfg: ModelConfig, backbone: nn.Module, bridge: Bridge | None, routing: LoraRouting,
                 n_tasks: int):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.bridge = bridge
        self.routing = routing
        self.n_tasks = n_tasks
        self.task_names = list(TASKS) if n_tasks == len(TASKS) else [f"task{i}" for i in range(n_tasks)]

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, slots: dict | None = None) -> torch.Tensor:
        """Input embeddings; with ``slots`` (the batch's slot keys) the bridge tokens are written in."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        if slots is None:
            return embeds
        if self.bridge is None:
            raise RuntimeError("CF slots given but the model was built with bridge.use_cf_slots = false")
        return self.bridge.inject(embeds, *(slots[k] for k in SLOT_KEYS))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor,
               slots: dict | None = None, detach_lora: bool = False, cache=None, **kwargs):
        """The backbone body's output (``last_hidden_state``; see :func:`output_cache`) for routed samples.

        ``cache`` is a key/value cache to continue from; ``kwargs`` go to the body (``position_ids``,
        ``use_cache``).
        """
        if cache is not None:   # transformers renamed `past_key_values` to `cache` (5.x)
            params = inspect.signature(self.backbone.base_model.forward).parameters
            kwargs["cache" if "cache" in params else "past_key_values"] = cache
        self._check_task_ids(task_ids)
        embeds = self.embed(input_ids, slots)
        with self.routing.active(task_ids, detach_lora):
            return self.backbone.base_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from hidden states (the backbone's own LM head)."""
        return self.backbone.get_output_embeddings()(hidden)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, slots: dict | None = None, detach_lora: bool = False, *,
                batch: dict | None = None, step: int = 0, total_steps: int = 1, mode: str = "two_stream",
                **loss_options):
        """Logits ``[B, L, V]`` of a routed batch; with ``batch=`` the training loss instead.

        ``model(batch=b, step=t, total_steps=T, mode=m, **options)`` is :meth:`loss` (so that a
        wrapping engine's ``engine(batch=...)`` call computes it, with the engine's own per-forward
        bookkeeping: ZeRO-3 counts micro-batches there to accumulate gradients); otherwise the
        logits (evaluation and tests).
        """
        if batch is not None:
            return self.loss(batch, step, total_steps, mode, **loss_options)
        return self.logits(self.hidden(input_ids, attention_mask, task_ids, slots, detach_lora).last_hidden_state)

    def _check_task_ids(self, task_ids: torch.Tensor) -> None:
        if task_ids.dim() != 1 or task_ids.numel() == 0:
            raise ValueError(f"task_ids: expected a non-empty [B] tensor, got shape {tuple(task_ids.shape)}")
        lo, hi = int(task_ids.min()), int(task_ids.max())
        if lo < 0 or hi >= self.n_tasks:
            raise ValueError(f"task_ids: values must be in [0, {self.n_tasks}), got min {lo}, max {hi}")

    # ------------------------------------------------------------------ objective
    def stream_loss(self, batch: dict, stream: str, detach_lora: bool = False, denom: float | None = None,
                    norm: str = "token"):
        """CE over the answer tokens of one stream; also per-token losses and their task ids.

        ``norm="token"``: the mean over every answer token of the batch (long answers weigh more);
        ``norm="sample"``: each row's mean over its own answer tokens, then the mean over rows.
        ``denom`` replaces the local count (tokens, or rows with an answer) as the divisor: a
        data-parallel trainer passes that count over all ranks / world_size, so that averaging
        the ranks' gradients gives the mean over the global batch, as one worker would.
        """
        ids, mask = batch[f"{stream}_input_ids"], batch[f"{stream}_attention_mask"]
        labels = batch[f"{stream}_labels"]
        slots = {k: batch[k] for k in SLOT_KEYS} if stream == "cf" else None
        hidden = self.hidden(ids, mask, batch["task_ids"], slots, detach_lora).last_hidden_state
        target = labels[:, 1:]
        answer = target != IGNORE_INDEX                       # position i predicts token i + 1
        logits = self.logits(hidden[:, :-1][answer])           # LM head on answer positions only
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        token_loss = F.cross_entropy(logits, target[answer], reduction="none")
        rows = torch.arange(ids.shape[0], device=ids.device).view(-1, 1).expand_as(target)[answer]
        if norm == "sample":
            per_row = answer.sum(1)
            weighted = token_loss / per_row[rows].clamp(min=1).to(token_loss.dtype)
            count = int((per_row > 0).sum())
            loss = weighted.sum() / (denom if denom is not None else max(count, 1))
        else:
            loss = token_loss.sum() / (denom if denom is not None else max(token_loss.numel(), 1))
        return loss, token_loss.detach(), batch["task_ids"][rows]

    def loss(self, batch: dict, step: int, total_steps: int, mode: str = "two_stream",
             denoms: dict[str, float] | None = None, curriculum: str = "loss", norm: str = "token"):
        """The curriculum loss of eq. (6) and float stats (w, per-stream and per-task losses).

        ``curriculum``: ``"loss"`` weighs the streams' losses by w(t) (eq. 6); ``"lr"`` adds them
        unweighted, the trainer applying w(t) to the learning rates of the parameter groups
        instead (Adam divides a loss weight out); ``"none"`` weighs both 0.5 at every step.
        ``denoms`` (``{"text": n, "cf": n}``, optional): per-stream divisors, see :meth:`stream_loss`.
        """
        denoms = denoms or {}
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if curriculum not in CURRICULA:
            raise ValueError(f"curriculum: expected one of {CURRICULA}, got {curriculum!r}")
        if norm not in LOSS_NORMS:
            raise ValueError(f"norm: expected one of {LOSS_NORMS}, got {norm!r}")
        w = curriculum_weight(step, total_steps)
        stats: dict[str, float] = {"w": w}
        l_text, tok, tid = self.stream_loss(batch, "text", denom=denoms.get("text"), norm=norm)
        self._stream_stats(stats, "text", l_text, tok, tid)
        if self.bridge is None:                      # text-only CKF (ablation): no CF stream
            stats["loss"] = stats["loss_text"]
            return l_text, stats
        l_cf, tok, tid = self.stream_loss(batch, "cf", detach_lora=(mode == "two_stream"), denom=denoms.get("cf"),
                                          norm=norm)
        self._stream_stats(stats, "cf", l_cf, tok, tid)
        a, b = {"loss": (w, 1.0 - w), "lr": (1.0, 1.0), "none": (0.5, 0.5)}[curriculum]
        loss = a * l_text + b * l_cf
        stats["loss"] = a * stats["loss_text"] + b * stats["loss_cf"]
        return loss, stats

    def _stream_stats(self, stats: dict, stream: str, loss, token_loss, token_task) -> None:
        # the token mean of this micro-batch, whatever divisor the optimised loss used
        stats[f"loss_{stream}"] = float(token_loss.double().mean()) if token_loss.numel() else 0.0
        stats[f"tokens_{stream}"] = float(token_loss.numel())
        sums = torch.zeros(self.n_tasks, dtype=torch.float64).index_add_(0, token_task.cpu(),
                                                                        token_loss.double().cpu())
        counts = torch.bincount(token_task.cpu(), minlength=self.n_tasks)
        for t, name in enumerate(self.task_names):
            if counts[t] > 0:
                stats[f"loss_{stream}/{name}"] = float(sums[t] / counts[t])

    # ------------------------------------------------------------------ trainable state
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see: bridge and LoRA adapters only."""
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of every trainable parameter (stable names, a few MB)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy a :meth:`trainable_state_dict` back in; missing/unexpected/misshaped names are errors."""
        own = dict((n, p) for n, p in self.named_parameters() if p.requires_grad)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]} "
                           f"({len(missing)} missing, {len(unexpected)} unexpected)")
        with torch.no_grad():
            for name, value in state.items():
                if name not in own:
                    continue
                if own[name].shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != model's {tuple(own[name].shape)}")
                own[name].copy_(value)

    def lora_layers(self) -> list[MultiLoraLinear]:
        """The Multi-LoRA layers of the backbone."""
        return multi_lora_layers(self.backbone)

    def export_peft(self, out_dir, base_model_name_or_path: str = "") -> dict:
        """One standard peft LoRA folder per task under ``out_dir`` (see :mod:`ckf_dist.model.export`)."""
        from ckf_dist.model.export import export_peft

        return export_peft(self, out_dir, base_model_name_or_path)


def _enable_checkpointing(backbone: nn.Module, routing: LoraRouting) -> None:
    kwargs = {"use_reentrant": False, "context_fn": routing.checkpoint_contexts}
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def embedding_norm(weight: torch.Tensor) -> float:
    """Median L2 norm of a token-embedding table's rows (a frozen backbone's "real token" scale);
    NaN for a table on the meta device (a model built only to count its parameters)."""
    if weight.is_meta:
        return float("nan")
    if hasattr(weight, "ds_id"):                      # ZeRO-3 partitioned: gather the table once
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return float(weight.detach().float().norm(dim=1).median())
    return float(weight.detach().float().norm(dim=1).median())


def build_ckf_model(cfg: ModelConfig, backbone: nn.Module, cf_user: torch.Tensor, cf_item: torch.Tensor,
                    n_tasks: int = 4, seed: int | None = None) -> CKFModel:
    """The one ordered place: freeze backbone -> inject Multi-LoRA -> attach bridge -> checkpointing.

    ``seed``: the new parts (LoRA A, the bridge's maps) are drawn from an RNG seeded with it
    alone, and the global RNG is left as it was. Without it they draw from the global RNG,
    whose state depends on how the backbone was loaded: a one-time model conversion on this
    rank, or ZeRO-3's partitioned load, draws from it first. Training passes ``seed`` so one
    config and seed start from the same weights on any rank, ZeRO stage and cache state.
    """
    family = family_of(backbone)                                   # preconditions
    cfg.lora.validate()
    cfg.bridge.validate()
    if multi_lora_layers(backbone):
        raise RuntimeError("build_ckf_model: this backbone already carries Multi-LoRA layers; load a fresh one")
    if n_tasks < 1:
        raise ValueError(f"n_tasks: must be >= 1, got {n_tasks}")
    embedding = backbone.get_input_embeddings().weight

    backbone.requires_grad_(False)                                 # 1. freeze
    devices = [embedding.device] if embedding.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        routing = LoraRouting()                                    # 2. inject Multi-LoRA
        inject_multi_lora(backbone, family, cfg.lora, n_tasks, routing)
        bridge = None                                              # 3. attach the bridge
        if cfg.bridge.use_cf_slots:
            bridge = Bridge(cf_user, cf_item, backbone.config.hidden_size, cfg.bridge, embedding_norm(embedding))
            bridge.to(device=embedding.device, dtype=embedding.dtype)
    if cfg.gradient_checkpointing:                                 # 4. activation checkpointing
        _enable_checkpointing(backbone, routing)
    backbone.config.use_cache = False

    model = CKFModel(cfg, backbone, bridge, routing, n_tasks)
    wrong = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n
             and not n.startswith("bridge.")]
    assert not wrong, f"only LoRA and bridge parameters may train, found {wrong[:5]}"   # postcondition
    return model
