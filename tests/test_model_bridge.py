"""The personalized mapping bridge: equations (1)-(4) and slot writes."""

from __future__ import annotations

import pytest
import torch

from ckf_dist.model import Bridge, BridgeConfig
from ckf_dist.model.testing import synthetic_batch

D, HIDDEN = 4, 16


def make_bridge(**kw) -> Bridge:
    torch.manual_seed(0)
    return Bridge(torch.randn(5, D), torch.randn(9, D), HIDDEN, BridgeConfig(**kw)).double()


def test_slots_written_and_nothing_else():
    bridge = make_bridge()
    batch = synthetic_batch([0, 1, 2], 5, 9, seed=1)
    embeds = torch.randn(*batch["cf_input_ids"].shape, HIDDEN, dtype=torch.float64)
    out = bridge.inject(embeds, batch["history"], batch["slot_row"], batch["slot_pos"], batch["slot_kind"],
                        batch["slot_cf_id"])
    written = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    written[batch["slot_row"], batch["slot_pos"]] = True
    assert torch.equal(out[~written], embeds[~written])                      # everything else untouched
    assert (out[written] != embeds[written]).all(-1).all()                    # every slot overwritten
    tokens = bridge.slot_tokens(batch["history"], batch["slot_row"], batch["slot_kind"], batch["slot_cf_id"])
    torch.testing.assert_close(out[batch["slot_row"], batch["slot_pos"]], tokens)
    assert out.shape == embeds.shape and embeds.grad_fn is None               # input not modified in place


def test_equations_mean_pooling():
    bridge = make_bridge()
    history = torch.tensor([[2, 5, -1], [-1, -1, -1]])
    p = bridge.pool_history(history)
    torch.testing.assert_close(p[0], (bridge.cf_item[2] + bridge.cf_item[5]).double() / 2)       # eq. (1)
    assert torch.equal(p[1], torch.zeros(D, dtype=torch.float64))             # empty history -> zeros
    w_u = bridge.user_matrix(history)                                         # eq. (2)
    torch.testing.assert_close(w_u[0], bridge.meta(p[0]).view(D, D))
    row, kind, cf_id = torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([3, 7])
    tokens = bridge.slot_tokens(history, row, kind, cf_id)
    torch.testing.assert_close(tokens[0], bridge.map_u(bridge.cf_user[3].double() @ w_u[0]))     # eq. (3)
    torch.testing.assert_close(tokens[1], bridge.map_v(bridge.cf_item[7].double()))               # eq. (4)


def test_personalization_and_shared_ablation():
    bridge = make_bridge()
    row, kind, cf_id = torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([3, 3])
    history = torch.tensor([[1, 2], [4, -1]])
    t = bridge.slot_tokens(history, row, kind, cf_id)
    assert not torch.allclose(t[0], t[1])              # same user, different histories -> different W_u
    shared = make_bridge(personalized=False)
    assert not hasattr(shared, "meta")
    t = shared.slot_tokens(history, row, kind, cf_id)
    torch.testing.assert_close(t[0], t[1])             # one mapping for everybody


def test_attention_pooling_is_a_convex_combination():
    bridge = make_bridge(pooling="attention")
    history = torch.tensor([[2, 5, -1], [-1, -1, -1], [4, 4, 4]])
    p = bridge.pool_history(history)
    items = bridge.cf_item.double()
    emb = items[torch.tensor([2, 5])]
    weights = torch.softmax(bridge.attn(emb).squeeze(-1), 0)
    torch.testing.assert_close(p[0], weights @ emb)
    assert torch.equal(p[1], torch.zeros(D, dtype=torch.float64))
    torch.testing.assert_close(p[2], items[4])


def test_bad_ids_are_clear_errors():
    bridge = make_bridge()
    history = torch.tensor([[1]])
    with pytest.raises(IndexError, match="user id out of range"):
        bridge.slot_tokens(history, torch.tensor([0]), torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(IndexError, match="item id out of range"):
        bridge.slot_tokens(history, torch.tensor([0]), torch.tensor([1]), torch.tensor([9]))
    with pytest.raises(ValueError, match="slot_kind"):
        bridge.slot_tokens(history, torch.tensor([0]), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="CF tables"):
        Bridge(torch.randn(3, 4), torch.randn(3, 5), 8, BridgeConfig())


@pytest.mark.parametrize("scale", ["match", "normalize"])
def test_slot_scale_puts_slot_tokens_at_the_embedding_norm(scale):
    from ckf_dist.model import ModelConfig, build_ckf_model, load_backbone

    g = torch.Generator().manual_seed(0)
    cf_user, cf_item = torch.randn(30, 8, generator=g) * 3, torch.randn(40, 8, generator=g) * 3
    b = synthetic_batch([0, 1, 2, 3], 30, 40)
    out = {}
    for choice in ("default", scale):
        cfg = ModelConfig(backbone="tiny-llama")
        cfg.bridge.slot_scale = choice
        bb, _ = load_backbone(cfg)
        model = build_ckf_model(cfg, bb, cf_user, cf_item)
        median = bb.get_input_embeddings().weight.detach().norm(dim=1).median().item()
        stats = model.bridge.token_norms(b["history"], b["slot_row"], b["slot_kind"], b["slot_cf_id"])
        assert stats["embed_norm"] == pytest.approx(median, rel=1e-5)
        with torch.no_grad():
            item_tokens = model.bridge.slot_tokens(torch.full((40, 1), -1), torch.arange(40),
                                                   torch.ones(40, dtype=torch.long), torch.arange(40))
        out[choice] = (stats, item_tokens.norm(dim=1), median)
    stats, item_norms, median = out[scale]
    # every item token (median exactly; normalize: each one) at the real tokens' median norm
    assert item_norms.median().item() == pytest.approx(median, rel=1e-3)
    if scale == "normalize":
        torch.testing.assert_close(item_norms, torch.full_like(item_norms, median), rtol=1e-4, atol=0)
    assert 0.5 * median < stats["slot_norm_user"] < 2 * median and 0.5 * median < stats["slot_norm_item"] < 2 * median
    default = out["default"][0]                # nn.Linear's init on CF rows of norm ~8: tens of times larger
    assert default["slot_norm_user"] > 10 * median and default["slot_norm_item"] > 10 * median
