"""Part ``train`` of bench/multilora_gpu.py: one CKF training step (bf16, fused kernels, gradient
checkpointing, both streams, AdamW) on a randomly initialised Llama-2-7B-shaped backbone:
tokens/s, MFU, peak memory (step_s: the shipped default, base GEMM and adapters in one op),
and the same step with the separate adapter op (side_op_step_s) and on the torch path.

Imported by bench/multilora_gpu.py after it has set TRITON_INTERPRET for ``--cpu-smoke``.
"""

from __future__ import annotations

import statistics
import time

import torch

import ckf_dist.kernels as K


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def build_backbone(smoke: bool, dev: str):
    """A randomly initialised Llama-2-7B-shaped model in bf16 on ``dev`` (tiny when ``smoke``)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=1000) if smoke else
          dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000))       # Llama-2-7B
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2, tie_word_embeddings=False, **kw)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)                    # random init on the GPU, no download
    finally:
        torch.set_default_dtype(old)
    return model.to(torch.bfloat16)


def part_train(res, batch_size, prompt_len, *, smoke: bool, dev: str, save=lambda res: None):
    """One CKF step through ckf_dist.model (fused kernels) and the same step on the torch path.
    ``save(res)`` is called as results come in, so a time limit still leaves the finished ones."""
    from ckf_dist.model import LoraConfig, ModelConfig, build_ckf_model
    from ckf_dist.model.testing import randomize_adapters, synthetic_batch
    import ckf_dist.model.multi_lora as mml
    calls = {"n": 0}
    real = {name: getattr(K, name) for name in ("multi_lora_triton", "linear_multi_lora_triton")}

    def counter(op):
        def counted(*a, **k):
            calls["n"] += 1
            return op(*a, **k)
        return counted
    for name, op in real.items():                            # the model looks them up per call
        setattr(K, name, counter(op))
    if smoke:                                                # the model uses the fused ops on CUDA only
        mml._kernel_device = lambda x: True
    t0 = time.time()
    backbone = build_backbone(smoke, dev)
    mcfg = ModelConfig(backbone="bench-random-llama", dtype="bfloat16", gradient_checkpointing=True,
                       lora=LoraConfig(r=16, alpha=64.0, dropout=0.1, fused_kernels=True))
    g = torch.Generator().manual_seed(0)
    model = build_ckf_model(mcfg, backbone, torch.randn(1000, 8, generator=g).to(dev),
                            torch.randn(2000, 8, generator=g).to(dev), n_tasks=4)
    randomize_adapters(model, std=0.01)
    model.train()
    build_s = time.time() - t0
    vocab = backbone.config.vocab_size
    batch = synthetic_batch([i % 4 for i in range(batch_size)], 1000, 2000, vocab=vocab, prompt_len=prompt_len,
                            answer_len=16, history_len=10, seed=1)
    batch = {k: v.to(dev) for k, v in batch.items()}
    tokens = int(batch["text_attention_mask"].sum() + batch["cf_attention_mask"].sum())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, eps=1e-6, weight_decay=1e-3)

    def step():
        loss, _ = model.loss(batch, step=10, total_steps=100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def timed(n):
        out = []
        for _ in range(n):
            _sync(dev)
            t = time.perf_counter()
            loss = step()
            _sync(dev)
            out.append(time.perf_counter() - t)
        return statistics.median(out), float(loss.detach())

    def loss_and_grads(path):
        """Loss and flat grads with LoRA dropout off (the only random op of this model: attention and
        hidden dropout are 0 in the config), so the paths compute the same function. Train mode is kept
        (checkpointing bounds the memory). path: "fused" (Triton op per token), "token" (the torch
        per-token contract op in the same place, same bf16 roundings: y + delta) or "torch" (the
        model's torch path: per-sample batched LoRA with the base add fused)."""
        drop = {}
        for layer in model.lora_layers():
            layer.fused_kernels, drop[layer] = path not in ("torch",), layer.dropout
            layer.fuse_base_gemm = path == "fused_gemm"
            layer.backend = "torch-token" if path == "token" else None
            layer.dropout = 0.0
        try:
            loss, _ = model.loss(batch, step=10, total_steps=100)
            params = model.trainable_parameters()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for layer, p in drop.items():
                layer.dropout, layer.backend = p, None
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                          for g, p in zip(grads, params)])
        return float(loss.detach()), flat

    def rdiff(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))
    (lf, gf), (lg, gg), (lk, gk), (lt, gt) = (loss_and_grads(p) for p in ("fused", "fused_gemm", "token", "torch"))
    agree = dict(loss_fused=lf, loss_fused_gemm=lg, loss_token=lk, loss_torch=lt, grad_rel_diff=rdiff(gf, gt),
                 grad_rel_fused_gemm_vs_torch=rdiff(gg, gt),
                 grad_rel_fused_vs_token=rdiff(gf, gk), grad_rel_token_vs_torch=rdiff(gk, gt),
                 compares="dropout 0 (no random op), same batch and weights; fused (side op) / fused_gemm "
                          "(base GEMM + adapters in one op) / token / torch LoRA paths")
    del gf, gg, gk, gt
    print(f"  fused vs torch path through the model: {agree}", flush=True)
    res["train_partial"] = dict(fused_vs_torch=agree)
    save(res)
    side_s = None
    for gemm in (False, True):                               # the shipped default (fused GEMM) last
        for layer in model.lora_layers():
            layer.fused_kernels, layer.fuse_base_gemm = True, gemm
        step()                                               # warm-up: kernels compile and tune, allocator
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        calls["n"] = 0
        fused_s, loss = timed(1 if smoke else 3)
        fused_calls = calls["n"] // (1 if smoke else 3)
        side_s = fused_s if not gemm else side_s
        res["train_partial"]["fused_gemm_step_s" if gemm else "side_op_step_s"] = fused_s
        save(res)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else float("nan")
    n_layer_params = sum(p.numel() for n, p in backbone.named_parameters()
                         if ".layers." in n and ".lora_" not in n and p.dim() == 2)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    flops = tokens * (4 * n_layer_params + 6 * n_lora)
    layers = model.lora_layers()
    for layer in layers:
        layer.fused_kernels = False
    step()
    torch_s, _ = timed(1 if smoke else 2)
    peak_ref = res.get("ceilings", {}).get("matmul_tflops")
    res["train"] = dict(batch=batch_size, prompt_len=prompt_len, tokens_per_step=tokens, build_s=build_s,
                        step_s=fused_s, tokens_per_s=tokens / fused_s, loss=loss, peak_mem_gib=peak,
                        fused_calls_per_step=fused_calls, torch_path_step_s=torch_s, fused_vs_torch=agree,
                        side_op_step_s=side_s,
                        flops_per_step=flops, achieved_tflops=flops / fused_s / 1e12,
                        mfu_vs_989=flops / fused_s / 989e12, mfu_vs_measured=(flops / fused_s / 1e12 / peak_ref)
                        if peak_ref else None, layer_params=n_layer_params, lora_params=n_lora)
    if not fused_calls:
        res["train"]["warning"] = "the model never called the fused ops: this step timed the torch path"
    res.pop("train_partial", None)
    print(f"  train: {res['train']}", flush=True)
    for name, op in real.items():
        setattr(K, name, op)
