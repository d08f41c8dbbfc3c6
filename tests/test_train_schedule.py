"""The optimisation schedule: LR curriculum per parameter group, loss normalisation, eos in the loss."""

from __future__ import annotations

import math

import pytest
import torch

from ckf_dist.contract import IGNORE_INDEX, TASKS
from ckf_dist.model import ModelConfig, build_ckf_model, curriculum_weight, load_backbone
from ckf_dist.model.testing import synthetic_batch
from ckf_dist.train.config import TrainConfig
from ckf_dist.train.schedule import group_lr_lambda, lr_lambda, mask_answer_eos, param_groups


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(backbone="tiny-llama")
    bb, _ = load_backbone(cfg)
    g = torch.Generator().manual_seed(0)
    return build_ckf_model(cfg, bb, torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g))


@pytest.mark.parametrize("curriculum", ["lr", "loss"])
def test_lr_curriculum_drives_each_groups_learning_rate(model, curriculum):
    T = 40
    tcfg = TrainConfig(lr=1e-3, lr_bridge=5e-3, warmup_ratio=0.0, curriculum=curriculum)
    groups = param_groups(model)
    assert set(groups) == {"lora", "bridge"}
    assert all(p.requires_grad for ps in groups.values() for p in ps)
    assert sum(len(ps) for ps in groups.values()) == len([p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.AdamW([{"params": groups["lora"], "lr": tcfg.lr}, {"params": groups["bridge"], "lr": tcfg.lr_bridge}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [group_lr_lambda(g, T, tcfg) for g in groups])
    base = lr_lambda(T, 0.0)
    seen = {}
    for step in range(T):
        seen[step] = [pg["lr"] for pg in opt.param_groups]
        opt.step()
        sched.step()
    for step in (0, T // 2, T - 1):
        w = curriculum_weight(step, T) if curriculum == "lr" else None
        lora, bridge = seen[step]
        if curriculum == "lr":
            assert lora == pytest.approx(1e-3 * base(step) * w) and bridge == pytest.approx(5e-3 * base(step) * (1 - w))
        else:
            assert lora == pytest.approx(1e-3 * base(step)) and bridge == pytest.approx(5e-3 * base(step))
    if curriculum == "lr":         # text first: the bridge barely moves at the start, LoRA barely at the end
        assert seen[0][1] < 0.001 * seen[0][0] * 5 and seen[T - 1][0] < 0.001 * seen[T - 1][1]
        assert seen[T // 2][0] / 1e-3 == pytest.approx(seen[T // 2][1] / 5e-3)


def test_loss_normalisation_per_token_and_per_sample(model):
    batch = synthetic_batch([0, 1, 2, 3], 5, 6, answer_len=3, seed=1)
    # rows with 1, 2, 3 and 3 answer tokens: drop labels so the rows differ in length
    labels = batch["text_labels"].clone()
    for row, keep in ((0, 1), (1, 2)):
        idx = (labels[row] != IGNORE_INDEX).nonzero().squeeze(-1)
        labels[row, idx[keep:]] = IGNORE_INDEX
    batch["text_labels"] = labels
    with torch.no_grad():
        token, tok_losses, _ = model.stream_loss(batch, "text", norm="token")
        sample, _, _ = model.stream_loss(batch, "text", norm="sample")
    per_row = (labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
    assert per_row == [1, 2, 3, 3]
    chunks = tok_losses.split(per_row)
    assert float(token) == pytest.approx(float(tok_losses.mean()))
    assert float(sample) == pytest.approx(sum(float(c.mean()) for c in chunks) / 4)
    assert not math.isclose(float(token), float(sample), rel_tol=1e-4)
    # the data-parallel divisor replaces the local row count
    with torch.no_grad():
        half, _, _ = model.stream_loss(batch, "text", norm="sample", denom=8.0)
    assert float(half) == pytest.approx(float(sample) / 2)


def test_curricula_weigh_the_streams(model):
    batch = synthetic_batch(list(range(len(TASKS))), 5, 6, seed=2)
    with torch.no_grad():
        out = {c: model.loss(batch, 0, 10, curriculum=c) for c in ("loss", "lr", "none")}
    lt, lc = out["loss"][1]["loss_text"], out["loss"][1]["loss_cf"]
    w = curriculum_weight(0, 10)
    assert float(out["loss"][0]) == pytest.approx(w * lt + (1 - w) * lc, rel=1e-5)
    assert float(out["lr"][0]) == pytest.approx(lt + lc, rel=1e-5)
    assert float(out["none"][0]) == pytest.approx(0.5 * (lt + lc), rel=1e-5)
    with pytest.raises(ValueError, match="curriculum"):
        model.loss(batch, 0, 10, curriculum="cosine")


def test_eos_can_be_left_out_of_the_loss():
    batch = synthetic_batch([0, 1], 5, 6, answer_len=3, seed=3)
    eos = int(batch["text_labels"][0][batch["text_labels"][0] != IGNORE_INDEX][-1])
    out = mask_answer_eos(batch, eos)
    for s in ("text", "cf"):
        assert not (out[f"{s}_labels"] == eos).any()
        changed = (batch[f"{s}_labels"] != out[f"{s}_labels"])
        assert changed.sum() >= 1 and (batch[f"{s}_labels"][changed] == eos).all()
    assert torch.equal(out["text_input_ids"], batch["text_input_ids"])


def test_step_line_shows_the_cf_stream_only_where_there_is_one(tmp_path, capsys):
    """A text-only run (no bridge) prints its text loss without a `cf nan`; a CKF run prints both."""
    from types import SimpleNamespace

    from ckf_dist.train.metrics_log import MetricsLog

    cfg = SimpleNamespace(run_name="r", train=SimpleNamespace(log_every=1, log_dir=str(tmp_path)))
    log = MetricsLog(cfg, rank=0)
    extra = {"lr": 1e-4, "samples_per_s": 2.0, "tokens_per_s": 100.0}
    log.step(1, 2, {"w": 1.0, "loss_text": 0.5, "loss": 0.5}, **extra)
    log.step(2, 2, {"w": 0.5, "loss_text": 0.5, "loss_cf": 0.25, "loss": 0.375}, **extra)
    log.close()
    text_only, ckf = capsys.readouterr().out.strip().splitlines()
    assert "text" not in text_only and "nan" not in text_only and "loss 0.5000" in text_only
    assert "text 0.500 cf 0.250 w 0.50" in ckf
