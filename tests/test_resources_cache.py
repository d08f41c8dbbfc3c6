"""The one-time conversions into an empty cache, from two processes of one distributed group at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import free_port

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
    from ckf_dist.model.backbone import load_backbone
    from ckf_dist.model.config import ModelConfig
    model, tok = load_backbone(ModelConfig())
    print("ok", model.config.model_type, len(tok), flush=True)
    dist.barrier()
""")


def test_two_ranks_convert_into_an_empty_cache(tmp_path):
    """Both ranks of one group (as two Ray workers are) get a complete backbone and tokenizer; before
    the lock and the rank-independent write, rank 1 renamed an empty folder into place and crashed."""
    from ckf_dist.errors import ResourceError
    from ckf_dist.resources import smollm2_gguf

    try:
        smollm2_gguf()
    except ResourceError as exc:
        pytest.skip(f"needs the embedded SmolLM2 wheel: {exc}")
    cache = tmp_path / "cache"
    env = {**os.environ, "CKF_CACHE": str(cache), "HOME": str(tmp_path / "home"), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(rank)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank}:\n{out[-3000:]}"
        assert "ok llama 49152" in out
    assert sorted(p.name for p in (cache / "smollm2-135m-instruct").iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]       # no temp folder left behind
