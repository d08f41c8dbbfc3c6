"""The generated DeepSpeed config and a user's DeepSpeed JSON on top of it."""

from __future__ import annotations

import json

import pytest

from ckf_dist.train.config import TrainConfig
from ckf_dist.train.deepspeed_config import TrainError, build_deepspeed_config


def test_generated_config_follows_ours():
    ds = build_deepspeed_config(TrainConfig(zero_stage=3, micro_batch_size=2, grad_accum=3), 4, "bfloat16")
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_allow_untested_optimizer"] is True      # our client AdamW on every stage


def test_user_json_overrides_and_batch_stays_consistent(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 5, "zero_optimization": {"overlap_comm": True}}))
    ds = build_deepspeed_config(TrainConfig(zero_stage=2, micro_batch_size=2, deepspeed_config=str(path)), 2, "float32")
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "reduce_scatter": True}
    assert ds["train_batch_size"] == 5 * 1 * 2


@pytest.mark.parametrize("text, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"checkpoint": {"load_universal": true}}', "load_universal"),
])
def test_bad_user_json_is_refused_naming_the_file(tmp_path, text, match):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(TrainError, match=match) as err:
        build_deepspeed_config(TrainConfig(deepspeed_config=str(path)), 1, "float32")
    assert str(path) in str(err.value)


def test_missing_user_json_is_refused(tmp_path):
    with pytest.raises(TrainError, match="not found"):
        build_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "nope.json")), 1, "float32")


def test_gradient_buckets_are_sized_to_the_trainable_set(tmp_path):
    """DeepSpeed allocates its whole reduce bucket (5e8 elements) every ZeRO-1/2 step; ours is the
    trainable count. A user's DeepSpeed JSON still wins, and ZeRO-3 keeps DeepSpeed's."""
    ds = build_deepspeed_config(TrainConfig(zero_stage=2), 8, "bfloat16", n_trainable=29_436_256)
    assert ds["zero_optimization"]["reduce_bucket_size"] == ds["zero_optimization"]["allgather_bucket_size"] == 29_436_256
    assert "reduce_bucket_size" not in build_deepspeed_config(TrainConfig(zero_stage=2), 8, "bfloat16")["zero_optimization"]
    big = build_deepspeed_config(TrainConfig(zero_stage=1), 8, "bfloat16", n_trainable=10**10)
    assert big["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    assert "reduce_bucket_size" not in build_deepspeed_config(TrainConfig(zero_stage=3), 8, "bfloat16",
                                                              n_trainable=10**6)["zero_optimization"]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123456}}))
    ds = build_deepspeed_config(TrainConfig(zero_stage=2, deepspeed_config=str(user)), 8, "bfloat16", n_trainable=10**6)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123456


def test_elastic_range_must_keep_the_global_batch():
    TrainConfig(num_workers=4, min_workers=1, micro_batch_size=1, grad_accum=3, max_failures=1).validate()   # 12 rows
    with pytest.raises(ValueError, match=r"on \[3\] worker\(s\)"):
        TrainConfig(num_workers=4, min_workers=2, micro_batch_size=1, grad_accum=1, max_failures=1).validate()
    with pytest.raises(ValueError, match="max_failures >= 1"):
        TrainConfig(num_workers=2, min_workers=1).validate()
    with pytest.raises(ValueError, match="min_workers: must be in"):
        TrainConfig(num_workers=2, min_workers=3, max_failures=1).validate()
    t = TrainConfig(num_workers=4, micro_batch_size=2, grad_accum=1)
    assert (t.on_workers(1).grad_accum, t.on_workers(2).grad_accum, t.on_workers(4)) == (4, 2, t)
    with pytest.raises(ValueError, match="cannot keep the global batch"):
        t.on_workers(3)
