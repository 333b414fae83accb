"""Behaviour pinned across refactors: the demo pipeline's score, selection and patched tensors hash
to the values in tests/data/golden.json (its `made_by` says which code made them). Made before
the stage-package refactor; the score hashes alone were remade when issue 13 changed the float
order of scoring (per-sample products, response-only head, token-budget batches), with the
selection and patched-tensor hashes unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

GOLDEN = Path(__file__).parent / "data" / "golden.json"
# The demo's spin.yaml at a smaller scale; both selection modes from the same cached scores.
YAML = """\
model: model
output: patched-{mode}
cache_dir: cache
retain: builtin:general
couple: [builtin:privacy, builtin:fairness]
score: {{method: {method}, nsamples: 16, keep: 0.05, targets: all, max_length: 128, device: cpu, dtype: float32}}
select: {{p: 0.01, q: 0.03, mode: {mode}}}
"""
SETTINGS = [("snip", "paper"), ("snip", "reference"), ("wanda", "paper")]


def tensors_sha256(files: list[Path]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, files in the order given (metadata ignored)."""
    h = hashlib.sha256()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in sorted(st.keys()):
                t = st.get_tensor(name).contiguous()
                h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pipeline_hashes(workdir: Path, build_demo_model) -> dict[str, str]:
    """Run each setting through `spinctl.run` on one tiny model; hash scores, selection and patched weights."""
    from spinctl.run import run
    from spinctl.runconfig import load_run_config

    build_demo_model(workdir / "model")
    out = {}
    for method, mode in SETTINGS:
        yaml = workdir / f"spin-{method}-{mode}.yaml"
        yaml.write_text(YAML.format(method=method, mode=mode).replace(f"patched-{mode}", f"patched-{method}-{mode}"))
        result = run(load_run_config(yaml), lambda s: None)
        key = f"{method}-{mode}"
        # Score files are named by a cache key (weight mtimes included): hash them in dataset order.
        out[f"{key} scores"] = tensors_sha256([Path(s["file"]) for s in result["scores"]])
        out[f"{key} selection"] = tensors_sha256([Path(result["selection"])])
        out[f"{key} patched"] = tensors_sha256(sorted(Path(result["output"]).glob("*.safetensors")))
        out[f"{key} zeroed"] = str(result["selected"])
    return out


def test_pipeline_matches_pre_refactor_outputs(tmp_path):
    from spinctl.demo.tiny import build_demo_model

    golden = json.loads(GOLDEN.read_text())
    if golden["torch"] != torch.__version__:
        pytest.skip(f"golden hashes were made with torch {golden['torch']}, this is {torch.__version__}")
    assert pipeline_hashes(tmp_path, build_demo_model) == golden["hashes"]
