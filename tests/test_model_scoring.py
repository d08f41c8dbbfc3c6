"""Task heads: ctr / rating from answer logits, candidate likelihoods (shared prefix vs naive), greedy."""

from __future__ import annotations

import time

import pytest
import torch

from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone
from ckf_dist.model import scoring
from ckf_dist.model.testing import randomize_adapters, synthetic_batch

TASKS = [0, 2, 1, 3]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gptneox"])
def model(request):
    cfg = ModelConfig(backbone=request.param)
    bb, _ = load_backbone(cfg)
    m = build_ckf_model(cfg, bb, torch.randn(6, 8), torch.randn(9, 8))
    randomize_adapters(m, std=0.2)
    return m.train()   # scoring must switch to eval itself


@pytest.mark.parametrize("stream", ["cf", "text"])
def test_ctr_and_rating_read_the_first_answer_position(model, stream):
    batch = synthetic_batch(TASKS, 6, 9, seed=2)
    logits = scoring.answer_logits(model, batch, stream)
    starts = scoring.prompt_lengths(batch, stream)
    for i in range(len(TASKS)):      # reference: a full forward of the row's prompt alone
        n = int(starts[i])
        ids = batch[f"{stream}_input_ids"][i:i + 1, :n]
        slots = scoring._row_slots(batch, stream, i)
        with torch.no_grad():
            model.eval()
            ref = model(ids, torch.ones_like(ids), batch["task_ids"][i:i + 1], slots)[0, -1]
        torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)
    model.train()
    scoring.answer_logits(model, batch, stream)
    assert model.training            # the caller's mode is restored
    p_yes = scoring.ctr_scores(model, batch, [5, 7], stream)
    torch.testing.assert_close(p_yes, torch.softmax(logits[:, [5, 7]], -1)[:, 1])
    expected, greedy = scoring.rating_scores(model, batch, [11, 12, 13, 14, 15], stream)
    probs = torch.softmax(logits[:, 11:16], -1)
    torch.testing.assert_close(expected, (probs * torch.arange(1.0, 6.0)).sum(-1))
    assert torch.equal(greedy, probs.argmax(-1).float() + 1) and ((1 <= expected) & (expected <= 5)).all()


@pytest.mark.parametrize("stream", ["cf", "text"])
def test_shared_prefix_candidates_equal_naive(model, stream):
    batch = synthetic_batch(TASKS[:2], 6, 9, seed=3)
    cands = [[[40, 41, 42], [50], [60, 61, 62, 63, 64], [40, 41, 43]]] * 2
    fast = scoring.sequential_logliks(model, batch, cands, stream, method="shared")
    naive = scoring.sequential_logliks(model, batch, cands, stream, method="full")
    for f, n in zip(fast, naive):
        assert f.shape == (4,)
        torch.testing.assert_close(f, n, rtol=1e-4, atol=1e-4)
        assert f[0] != f[3]                   # candidates sharing a prefix are still told apart


def test_greedy_generation_matches_stepwise_argmax(model):
    batch = synthetic_batch(TASKS[:3], 6, 9, seed=4)
    out = scoring.greedy_generate(model, batch, max_new_tokens=4, eos_id=-1)
    starts = scoring.prompt_lengths(batch, "cf")
    for i in range(3):                        # reference: no cache, no padding, one row at a time
        ids = batch["cf_input_ids"][i:i + 1, :int(starts[i])]
        slots = scoring._row_slots(batch, "cf", i)
        model.eval()
        with torch.no_grad():
            for _ in range(4):
                nxt = model(ids, torch.ones_like(ids), batch["task_ids"][i:i + 1], slots)[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert out[i] == ids[0, int(starts[i]):].tolist()
    model.train()


@pytest.mark.slow
def test_smollm2_loads_offline_and_scores_ctr(monkeypatch):
    """The embedded SmolLM2-135M (cached GGUF conversion) scores a ctr prompt, with and without CF slots."""
    from ckf_dist.model.backbone import smollm2_folder
    from ckf_dist.resources import cache_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()
    started = time.time()
    assert (smollm2_folder() / "model.safetensors").is_file()     # converts once (~30 s) when not cached
    cfg = ModelConfig(backbone="smollm2")
    bb, tok = load_backbone(cfg)
    assert bb.config.model_type == "llama" and bb.config.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in bb.parameters()) < 140e6
    model = build_ckf_model(cfg, bb, torch.randn(4, 8), torch.randn(4, 8))
    yes, no = tok.encode("Yes", add_special_tokens=False), tok.encode("No", add_special_tokens=False)
    assert len(yes) == len(no) == 1
    prompt = ("<|im_start|>user\nThe user watched Toy Story, Heat and Fargo. Will the user like the movie "
              "Jumanji (1995)? Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    p_ids = tok.encode(prompt, add_special_tokens=False)
    ids = torch.tensor([p_ids + yes])
    labels = torch.full_like(ids, -100)
    labels[0, -1] = yes[0]
    batch = {"task_ids": torch.tensor([0]), "history": torch.tensor([[0, 1, 2]]),
             "text_input_ids": ids, "text_attention_mask": torch.ones_like(ids), "text_labels": labels,
             "cf_input_ids": ids, "cf_attention_mask": torch.ones_like(ids), "cf_labels": labels,
             "slot_row": torch.tensor([0, 0]), "slot_pos": torch.tensor([3, 5]),
             "slot_kind": torch.tensor([0, 1]), "slot_cf_id": torch.tensor([1, 3])}
    p_text = scoring.ctr_scores(model, batch, [no[0], yes[0]], "text")
    p_cf = scoring.ctr_scores(model, batch, [no[0], yes[0]], "cf")
    logits = scoring.answer_logits(model, batch, "text")[0]
    top2 = set(logits.topk(5).indices.tolist())
    print(f"SmolLM2 P(Yes) text={p_text.item():.3f} cf={p_cf.item():.3f}, {time.time() - started:.1f}s")
    assert 0 < p_text.item() < 1 and 0 < p_cf.item() < 1 and p_cf.item() != p_text.item()
    assert yes[0] in top2 or no[0] in top2    # a real pretrained model answers the question's way
    assert time.time() - started < (60 if cached else 120)
