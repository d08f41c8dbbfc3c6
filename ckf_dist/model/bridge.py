"""The personalized mapping bridge: frozen CF embeddings -> tokens in the LLM's input space.

docs/method.md, "Knowledge fusion", for user u with history I_u:

    p_u        = mean_{j in I_u} E_V[j]           (1)  (or attention pooling over I_u)
    W_u        = reshape(MetaNet(p_u), d, d)      (2)  MetaNet: d -> meta_hidden -> d*d
    user token = Map_U(e_u @ W_u)                 (3)
    item token = Map_V(e_v)                       (4)

The tokens replace the input embeddings at the slot positions of the prompt; nothing else
in ``inputs_embeds`` changes. The CF tables are frozen buffers (not saved, not trained).
"""

from __future__ import annotations

import torch
from torch import nn

from ckf_dist.contract import ITEM_SLOT, USER_SLOT
from ckf_dist.model.config import BridgeConfig



class Bridge(nn.Module):
    """MetaNet + Map_U + Map_V over frozen CF tables ``cf_user [n_users, d]``, ``cf_item [n_items, d]``."""

    def __init__(self, cf_user: torch.Tensor, cf_item: torch.Tensor, hidden: int, cfg: BridgeConfig,
                 embed_norm: float | None = None):
        super().__init__()
        if cf_user.dim() != 2 or cf_item.dim() != 2 or cf_user.shape[1] != cf_item.shape[1]:
            raise ValueError(f"CF tables must be [n_users, d] and [n_items, d], got {tuple(cf_user.shape)} "
                             f"and {tuple(cf_item.shape)}")
        d = cf_user.shape[1]
        self.d, self.cfg = d, cfg
        self.register_buffer("cf_user", cf_user.detach().clone().float(), persistent=False)
        self.register_buffer("cf_item", cf_item.detach().clone().float(), persistent=False)
        if cfg.personalized:
            act = nn.ReLU() if cfg.meta_activation == "relu" else nn.Identity()
            self.meta = nn.Sequential(nn.Linear(d, cfg.meta_hidden), act, nn.Linear(cfg.meta_hidden, d * d))
            with torch.no_grad():   # our choice: W_u starts near the identity, so step 0 maps e_u unchanged
                self.meta[2].weight.mul_(0.1)
                self.meta[2].bias.copy_(torch.eye(d).flatten())
        else:                       # ablation: one shared d x d mapping for every user
            self.shared_map = nn.Parameter(torch.eye(d))
        if cfg.pooling == "attention":   # score_j = w^T relu(V e_j), softmax over the history
            self.attn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1, bias=False))
        self.map_u = nn.Linear(d, hidden)
        self.map_v = nn.Linear(d, hidden)
        # the backbone's median token-embedding norm (a constant of the frozen backbone, not saved)
        self.register_buffer("embed_norm", torch.tensor(float(embed_norm or 0.0)), persistent=False)
        if cfg.slot_scale != "default":
            if not embed_norm:
                raise ValueError(f"bridge.slot_scale={cfg.slot_scale!r} needs the backbone's embedding norm")
            self._match_init(float(embed_norm))

    def _match_init(self, target: float) -> None:
        """Map_U/Map_V with zero bias and random weights scaled so the median token norm is ``target``.

        The median is taken over the CF table the layer maps (Map_U sees e_u W_u, and W_u starts
        near the identity), so the tokens start where the backbone's real tokens are.
        """
        g = torch.Generator().manual_seed(0)
        for layer, table in ((self.map_u, self.cf_user), (self.map_v, self.cf_item)):
            w = torch.randn(layer.weight.shape, generator=g, dtype=torch.float32)
            median = float((table.float() @ w.T).norm(dim=1).median()) if table.numel() else 0.0
            with torch.no_grad():
                layer.weight.copy_(w * (target / median if median > 0 else 0.0))
                layer.bias.zero_()

    def token_norms(self, history: torch.Tensor, slot_row: torch.Tensor, slot_kind: torch.Tensor,
                    slot_cf_id: torch.Tensor) -> dict[str, float]:
        """Mean norm of the batch's user and item slot tokens, beside the backbone's median embedding norm."""
        with torch.no_grad():
            norms = self.slot_tokens(history, slot_row, slot_kind, slot_cf_id).float().norm(dim=-1)
        out = {"embed_norm": float(self.embed_norm)}
        for kind, name in ((USER_SLOT, "user"), (ITEM_SLOT, "item")):
            sel = norms[slot_kind == kind]
            if sel.numel():
                out[f"slot_norm_{name}"] = float(sel.mean())
        return out

    def pool_history(self, history: torch.Tensor) -> torch.Tensor:
        """p_u of eq. (1) for ``history [B, H]`` (-1 padded); an empty history gives zeros."""
        valid = history >= 0
        emb = self.cf_item[history.clamp(min=0)] * valid.unsqueeze(-1)            # [B, H, d]
        emb = emb.to(self.map_u.weight.dtype)
        if self.cfg.pooling == "attention":
            scores = self.attn(emb).squeeze(-1).masked_fill(~valid, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)              # all-padded rows -> 0
            return (weights.unsqueeze(-1) * emb).sum(1)
        return emb.sum(1) / valid.sum(1, keepdim=True).clamp(min=1).to(emb.dtype)

    def user_matrix(self, history: torch.Tensor) -> torch.Tensor:
        """W_u of eq. (2): ``[B, d, d]`` (the shared mapping, expanded, when not personalized)."""
        if not self.cfg.personalized:
            return self.shared_map.expand(history.shape[0], self.d, self.d)
        return self.meta(self.pool_history(history)).view(-1, self.d, self.d)

    def slot_tokens(self, history: torch.Tensor, slot_row: torch.Tensor, slot_kind: torch.Tensor,
                    slot_cf_id: torch.Tensor) -> torch.Tensor:
        """The token of every slot, ``[S, hidden]``: eq. (3) for user slots, eq. (4) for item slots."""
        self._check_ids(slot_kind, slot_cf_id)
        dtype = self.map_u.weight.dtype
        tokens = self.map_u.weight.new_zeros(slot_kind.shape[0], self.map_u.out_features)
        user = (slot_kind == USER_SLOT).nonzero().squeeze(-1)
        item = (slot_kind == ITEM_SLOT).nonzero().squeeze(-1)
        if user.numel():
            w_u = self.user_matrix(history[slot_row[user]])                        # [Su, d, d]
            e_u = self.cf_user[slot_cf_id[user]].to(dtype)                          # [Su, d]
            tokens = tokens.index_put((user,), self.map_u(torch.bmm(e_u.unsqueeze(1), w_u).squeeze(1)))
        if item.numel():
            tokens = tokens.index_put((item,), self.map_v(self.cf_item[slot_cf_id[item]].to(dtype)))
        if self.cfg.slot_scale == "normalize":
            tokens = tokens * (self.embed_norm.to(dtype) / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return tokens

    def inject(self, embeds: torch.Tensor, history: torch.Tensor, slot_row: torch.Tensor, slot_pos: torch.Tensor,
               slot_kind: torch.Tensor, slot_cf_id: torch.Tensor) -> torch.Tensor:
        """``embeds [B, L, hidden]`` with the slot tokens written at ``(slot_row, slot_pos)`` only."""
        if slot_row.numel() == 0:
            return embeds
        tokens = self.slot_tokens(history, slot_row, slot_kind, slot_cf_id).to(embeds.dtype)
        return embeds.index_put((slot_row, slot_pos), tokens)

    def _check_ids(self, slot_kind: torch.Tensor, slot_cf_id: torch.Tensor) -> None:
        for kind, table, what in ((USER_SLOT, self.cf_user, "user"), (ITEM_SLOT, self.cf_item, "item")):
            ids = slot_cf_id[slot_kind == kind]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
                raise IndexError(f"slot_cf_id: {what} id out of range [0, {table.shape[0]}): "
                                 f"min {int(ids.min())}, max {int(ids.max())} (CF tables and shards disagree?)")
        bad = ~((slot_kind == USER_SLOT) | (slot_kind == ITEM_SLOT))
        if bool(bad.any()):
            raise ValueError(f"slot_kind: expected 0 (user) or 1 (item), got {slot_kind[bad].unique().tolist()}")
