"""Multi-LoRA layers: one task-shared adapter plus T task adapters on a frozen linear layer.

Every token is routed to its own sample's task adapter inside one mixed-task batch, with
no Python loop over samples or tasks (docs/method.md, "Multi-LoRA"):

    delta(x) = s_s * B_s A_s x  +  s_t * B_{t(x)} A_{t(x)} x          s = alpha / r

The math lives in :mod:`ckf_dist.model.lora_ops` (the per-token contract op
:func:`multi_lora_torch`, re-exported here, and the per-sample batched path); on CUDA the fused
``ckf_dist.kernels.multi_lora_triton`` takes the contract op's place when available.
Weights use peft's layout: ``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ckf_dist.model.lora_ops import (LoraWeights, linear_per_sample_lora, lora_dropout, lora_dropout_mask,
                                     multi_lora_torch, per_sample_lora)

__all__ = ["AdapterSpec", "LoraRouting", "LoraWeights", "MultiLoraLinear", "inject_multi_lora", "multi_lora_layers",
           "multi_lora_torch"]


class LoraRouting:
    """Per-forward state shared by all Multi-LoRA layers of one model: task ids and detach mode.

    Set by :class:`~ckf_dist.model.ckf.CKFModel` around each forward. Under activation
    checkpointing, :meth:`checkpoint_contexts` (the ``context_fn`` of torch.utils.checkpoint)
    restores the state that was active in the forward when a layer is recomputed in backward.
    """

    def __init__(self) -> None:
        self.task_ids: torch.Tensor | None = None    # [B] one id per sample
        self.detach: bool = False                    # True: adapters act as constants (CF stream)

    @contextlib.contextmanager
    def active(self, task_ids: torch.Tensor, detach: bool = False):
        """Route the samples of the next forward: ``task_ids [B]``; ``detach`` freezes the adapters."""
        saved = (self.task_ids, self.detach)
        self.task_ids, self.detach = task_ids, detach
        try:
            yield self
        finally:
            self.task_ids, self.detach = saved

    def checkpoint_contexts(self):
        """``context_fn`` for non-reentrant checkpointing: recompute under the forward's routing."""
        return contextlib.nullcontext(), self.active(self.task_ids, self.detach)

    def sample_task_ids(self, x: torch.Tensor) -> torch.Tensor:
        """The per-sample task ids ``[B]`` for activations ``x [B, ..., in]``."""
        if self.task_ids is None:
            raise RuntimeError("Multi-LoRA layer called without task ids: run the model through CKFModel "
                               "(or inside `with model.routing.active(task_ids):`)")
        if x.shape[0] != self.task_ids.shape[0]:
            raise RuntimeError(f"Multi-LoRA: batch of {x.shape[0]} rows but {self.task_ids.shape[0]} task ids")
        return self.task_ids

    def token_task_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token task ids ``[N]`` for activations ``x [B, ..., in]`` (the sample's id broadcast)."""
        ids = self.sample_task_ids(x)
        return ids.view(-1, 1).expand(x.shape[0], math.prod(x.shape[1:-1])).reshape(-1)


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter kind on one module: rank, alpha and the output indices it writes (None = all)."""

    r: int
    alpha: float
    out_index: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _triton_op(name: str = "multi_lora_triton"):
    """The fused CUDA kernel with the same signature (or ``linear_multi_lora_triton``, the base
    GEMM and the adapters in one op), or None when it cannot be imported or run here."""
    try:
        kernels = importlib.import_module("ckf_dist.kernels")   # written behind the same contract
        op = getattr(kernels, name)
    except (ImportError, AttributeError):
        return None
    available = getattr(kernels, "triton_available", None)
    if available is not None and not available():
        return None
    return op


# hooks registered for every module (torch.nn.modules.module.register_module_forward_hook & co.)
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def _kernel_device(x: torch.Tensor) -> bool:
    """Do the Triton ops take this tensor? CUDA only (tests patch this to run the interpreter on CPU)."""
    return x.is_cuda


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"      # transformers.pytorch_utils.Conv1D: weight [in, out]


def io_features(base: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear projection (``nn.Linear`` or GPT-2 ``Conv1D``); anything else is an error."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    raise ValueError(f"LoRA targets must be nn.Linear or Conv1D projections, got {type(base).__name__}")


def _init_lora_a(a: torch.Tensor) -> None:
    """peft's init of ``lora_A``: kaiming-uniform with a = sqrt(5), fan_in = ``in``."""
    for block in a.view(-1, a.shape[-2], a.shape[-1]):
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a shared and T task LoRA adapters.

    ``lora_shared_A [rs, in]``, ``lora_shared_B [out_s, rs]``, ``lora_task_A [T, rt, in]``,
    ``lora_task_B [T, out_t, rt]``; ``out_s``/``out_t`` are the slice of a fused qkv output
    that the adapter owns (the whole output otherwise). B starts at zero, A as in peft.
    """

    def __init__(self, base: nn.Module, name: str, n_tasks: int, shared: AdapterSpec | None,
                 task: AdapterSpec | None, dropout: float, routing: LoraRouting, fused_kernels: bool = True,
                 fuse_base_gemm: bool = True):
        super().__init__()
        if shared is None and task is None:
            raise ValueError(f"{name}: a Multi-LoRA layer needs a shared or a task adapter")
        self.base = base
        self.name = name                      # module path in the untouched backbone (peft export)
        self.conv1d = _is_conv1d(base)
        w = base.weight
        self.in_features, self.out_features = io_features(base)
        self.n_tasks = n_tasks
        self.shared, self.task = shared, task
        self.dropout = dropout
        self.routing = routing
        self._forced: str | None = None
        self._plans: dict[tuple, str] = {}                # input kind -> backend name
        self.fused_kernels = fused_kernels
        self.fuse_base_gemm = fuse_base_gemm
        self.one_op = shared is not None and task is not None and _same_index(shared.out_index, task.out_index)
        kw = dict(device=w.device, dtype=w.dtype)
        if shared is not None:
            self.lora_shared_A = nn.Parameter(torch.empty(shared.r, self.in_features, **kw))
            self.lora_shared_B = nn.Parameter(torch.zeros(self._width(shared), shared.r, **kw))
            self.register_buffer("shared_index", shared.out_index, persistent=False)
        if task is not None:
            self.lora_task_A = nn.Parameter(torch.empty(n_tasks, task.r, self.in_features, **kw))
            self.lora_task_B = nn.Parameter(torch.zeros(n_tasks, self._width(task), task.r, **kw))
            self.register_buffer("task_index", task.out_index, persistent=False)
        self.reset_adapters()

    def _width(self, spec: AdapterSpec) -> int:
        return self.out_features if spec.out_index is None else int(spec.out_index.numel())

    def reset_adapters(self) -> None:
        """A kaiming-uniform (peft), B zeros: the adapted layer starts equal to the base layer."""
        with torch.no_grad():
            for kind in ("shared", "task"):
                if getattr(self, kind) is not None:
                    _init_lora_a(getattr(self, f"lora_{kind}_A"))
                    getattr(self, f"lora_{kind}_B").zero_()

    # -- backend choice: once per (device, dtype, input rank, base plain?, decode-sized?) ---------------
    #
    # "fused-linear"  the projection's GEMM with the adapters in its epilogue (Triton, one op)
    # "fused"         the base module, then the fused adapter kernel on flattened tokens (Triton)
    # "torch-linear"  the projection and the per-sample adapters as one torch autograd op
    # "torch-sample"  the base module, then the per-sample batched adapters (torch)
    # "torch-token"   the base module, then the per-token contract op (torch; inputs not [B, L, in])
    BACKENDS = ("fused-linear", "fused", "torch-linear", "torch-sample", "torch-token")

    @property
    def fused_kernels(self) -> bool:
        return self._fused_kernels

    @fused_kernels.setter
    def fused_kernels(self, value: bool) -> None:
        self._fused_kernels = bool(value)
        self._plans = {}

    @property
    def fuse_base_gemm(self) -> bool:
        return self._fuse_base_gemm

    @fuse_base_gemm.setter
    def fuse_base_gemm(self, value: bool) -> None:
        self._fuse_base_gemm = bool(value)
        self._plans = {}

    @property
    def backend(self) -> str | None:
        """A backend forced for every call (one of :attr:`BACKENDS`), or None: chosen per input kind."""
        return self._forced

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None and name not in self.BACKENDS:
            raise ValueError(f"{self.name}: unknown Multi-LoRA backend {name!r}; one of {', '.join(self.BACKENDS)}")
        self._forced = name
        self._plans = {}

    def backend_for(self, x: torch.Tensor) -> str:
        """The backend this layer runs ``x`` with (decided on the first input of its kind, then reused)."""
        key = (x.device.type, x.dtype, x.dim(), self._base_is_plain(),
               x.numel() >= 128 * self.in_features)
        name = self._plans.get(key)
        if name is None:
            name = self._plans[key] = self._forced or self._choose(x)
        return name

    def _choose(self, x: torch.Tensor) -> str:
        kernels = self.fused_kernels and _kernel_device(x)
        one_projection = self.fuse_base_gemm and self._one_projection_op()
        if kernels and one_projection and _triton_op("linear_multi_lora_triton") is not None:
            # on CUDA fp32 products would run on FMA units, far below cuBLAS's GEMM, and fewer than
            # 128 rows (decoding) would leave most of the GEMM's 64-256-row tiles empty
            if not x.is_cuda or (x.dtype in (torch.bfloat16, torch.float16) and x.numel() >= 128 * self.in_features):
                return "fused-linear"
        if kernels and _triton_op() is not None:
            return "fused"
        if x.dim() != 3:
            return "torch-token"
        return "torch-linear" if one_projection else "torch-sample"

    def _base_is_plain(self) -> bool:
        """Does the base module's forward do only its GEMM? ZeRO-3 gathers a partitioned weight in a
        pre-forward hook (and marks it ``ds_id``); offloading or profiling wrappers hook it too, as
        may hooks on every module. One op would skip all of that, so a hooked base runs as a module."""
        hooked = (self.base._forward_pre_hooks or self.base._forward_hooks or self.base._backward_pre_hooks
                  or self.base._backward_hooks or any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS))
        return not (hasattr(self.base.weight, "ds_id") or hooked)

    def _one_projection_op(self) -> bool:
        """Can the base projection and the adapters run as one op? Adapters on all outputs, frozen plain base."""
        groups = self._groups()
        weight, bias = self.base.weight, getattr(self.base, "bias", None)
        if (len(groups) != 1 or groups[0][1] is not None or weight.requires_grad
                or (bias is not None and bias.requires_grad)):
            return False
        return self._base_is_plain()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "_run_" + self.backend_for(x).replace("-", "_"))(x)

    # -- the backends ---------------------------------------------------------------------------------

    def _run_fused_linear(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        keep, keep_scale = lora_dropout_mask(x2, self.dropout, self.training)   # applied inside the op
        w = self.base.weight.t() if self.conv1d else self.base.weight      # as [out, in] (a view for Conv1D)
        (kinds, _), = self._groups()
        y = _triton_op("linear_multi_lora_triton")(x2, w, getattr(self.base, "bias", None),
                                                   *self._adapters(kinds, keep_scale).contract_args(
                                                       self.routing.token_task_ids(x)), lora_mask=keep)
        return y.view(*x.shape[:-1], self.out_features)

    def _run_torch_linear(self, x: torch.Tensor) -> torch.Tensor:
        keep, keep_scale = lora_dropout_mask(x, self.dropout, self.training, as_bool=False)
        (kinds, _), = self._groups()
        return linear_per_sample_lora(x, self.base.weight, getattr(self.base, "bias", None), keep,
                                      self._adapters(kinds, keep_scale), self.routing.sample_task_ids(x),
                                      weight_in_out=self.conv1d)

    def _run_fused(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_per_token(x, _triton_op())

    def _run_torch_token(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_per_token(x, multi_lora_torch)

    def _run_per_token(self, x: torch.Tensor, op) -> torch.Tensor:
        """The base module, then a contract op on flattened tokens ``[N, in]`` with per-token task ids."""
        xd, keep_scale = lora_dropout(x, self.dropout, self.training)     # dropout on x before the shrink
        xd, y = xd.reshape(-1, self.in_features), self.base(x).reshape(-1, self.out_features)
        ids = self.routing.token_task_ids(x)
        for kinds, index in self._groups():
            delta = op(xd, *self._adapters(kinds, keep_scale).contract_args(ids))
            y = y + delta if index is None else y.index_add(-1, index, delta)
        return y.view(*x.shape[:-1], self.out_features)

    def _run_torch_sample(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xd, keep_scale = lora_dropout(x, self.dropout, self.training)
        ids = self.routing.sample_task_ids(x)
        for kinds, index in self._groups():
            adapters = self._adapters(kinds, keep_scale)
            if index is None:
                y = per_sample_lora(xd, adapters, ids, base_out=y)
            else:
                y = y.index_add(-1, index, per_sample_lora(xd, adapters, ids))
        return y

    def _adapters(self, kinds: tuple[str, ...], keep_scale: float) -> LoraWeights:
        """The weights of one adapter op (detached in the CF stream); the scales carry dropout's 1 / (1 - p)."""
        parts = {}
        for kind in kinds:
            a, b = getattr(self, f"lora_{kind}_A"), getattr(self, f"lora_{kind}_B")
            parts[kind] = (a.detach(), b.detach()) if self.routing.detach else (a, b)
        a_s, b_s = parts.get("shared", (None, None))
        a_t, b_t = parts.get("task", (None, None))
        return LoraWeights(a_s, b_s, a_t, b_t, self.shared.scale * keep_scale if "shared" in parts else 0.0,
                           self.task.scale * keep_scale if "task" in parts else 0.0)

    def _groups(self) -> list[tuple[tuple[str, ...], torch.Tensor | None]]:
        """(adapter kinds, output index) per adapter op: one op when both kinds write the same outputs."""
        if self.one_op:
            return [(("shared", "task"), self.task_index)]
        groups = []
        if self.shared is not None:
            groups.append((("shared",), self.shared_index))
        if self.task is not None:
            groups.append((("task",), self.task_index))
        return groups

    def extra_repr(self) -> str:
        parts = [f"in={self.in_features}, out={self.out_features}, tasks={self.n_tasks}"]
        for kind in ("shared", "task"):
            spec = getattr(self, kind)
            if spec is not None:
                part = f"{kind}: r={spec.r} alpha={spec.alpha:g}"
                parts.append(part + ("" if spec.out_index is None else f" on {spec.out_index.numel()} outputs"))
        return ", ".join(parts)


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def multi_lora_layers(model: nn.Module) -> list[MultiLoraLinear]:
    """All Multi-LoRA layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, MultiLoraLinear)]


def _out_index(family, config, roles: list[str], width: int) -> torch.Tensor | None:
    """Union of the output indices that ``roles`` own in one module of ``width`` outputs (None: all)."""
    parts = [family.out_index(config, r) for r in roles]
    if any(p is None for p in parts):
        return None
    index = torch.unique(torch.cat(parts))            # sorted
    return None if index.numel() == width else index


def inject_multi_lora(model: nn.Module, family, lora_cfg, n_tasks: int, routing: LoraRouting) -> list[MultiLoraLinear]:
    """Replace every targeted projection of ``model`` by a :class:`MultiLoraLinear` (in place).

    Targets are roles of ``family`` (q/k/v/o) or raw module-name suffixes; a role of a fused
    qkv projection gets only its output slice. Returns the new layers; no target found is an error.
    """
    plan: dict[str, dict[str, list[str]]] = {}
    names = [n for n, _ in model.named_modules()]
    for kind, targets in (("shared", lora_cfg.shared_targets), ("task", lora_cfg.task_targets)):
        for role in targets:
            suffix = family.module_for(role)
            hits = [n for n in names if n == suffix or n.endswith("." + suffix)]
            if not hits:
                raise ValueError(f"model.lora.{kind}_targets: {role!r} (module suffix {suffix!r}) matches no module "
                                 f"of this {model.config.model_type} backbone; roles are q/k/v/o or module suffixes")
            for n in hits:
                plan.setdefault(n, {}).setdefault(kind, []).append(role)
    rs = lora_cfg.shared_r or lora_cfg.r
    shared_alpha = lora_cfg.shared_alpha or lora_cfg.alpha
    layers = []
    for name, kinds in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, MultiLoraLinear):
            raise RuntimeError(f"{name}: Multi-LoRA already injected")
        try:
            width = io_features(base)[1]
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (model.lora targets)") from None
        shared = AdapterSpec(rs, shared_alpha, _out_index(family, model.config, kinds["shared"], width)) \
            if "shared" in kinds else None
        task = AdapterSpec(lora_cfg.r, lora_cfg.alpha, _out_index(family, model.config, kinds["task"], width)) \
            if "task" in kinds else None
        layer = MultiLoraLinear(base, name, n_tasks, shared, task, lora_cfg.dropout, routing, lora_cfg.fused_kernels,
                                lora_cfg.fuse_base_gemm)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers
