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
