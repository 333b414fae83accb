"""Hub ids (org/name[@rev]) resolved offline from a cache laid out as huggingface_hub lays it out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from clirun import cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, model: Path, repo: str = "org/tiny") -> Path:
    """models--org--tiny/{blobs/SHA, snapshots/COMMIT/NAME -> ../../blobs/SHA, refs/main, refs/v1}."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    snap = base / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (base / "blobs" / sha).write_bytes(data)
        os.symlink(f"../../blobs/{sha}", snap / f.name)
    (base / "refs" / "main").write_text(COMMIT)
    (base / "refs" / "v1").write_text(COMMIT)
    return snap


def hub_env(cache: Path) -> dict:
    """The CLI's environment: hub ids resolved from `cache`, HF_HUB_OFFLINE unset."""
    return {"HF_HUB_OFFLINE": None, "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}


@pytest.fixture
def cached(tiny_model, tmp_path):
    cache = tmp_path / "hf" / "hub"
    snap = hub_cache(cache, tiny_model())
    return cache, snap


def test_inspect_resolves_refs_and_revisions(cached, tmp_path):
    cache, snap = cached
    for spec in ("org/tiny", "org/tiny@main", "org/tiny@v1", f"org/tiny@{COMMIT}"):
        r = cli("inspect", spec, "--json", env=hub_env(cache), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == str(snap)


def test_unknown_id_says_where_it_looked(cached, tmp_path):
    cache, _ = cached
    for spec, tail in (("org/other", "models--org--other"), ("org/tiny@v9", "models--org--tiny")):
        r = cli("inspect", spec, env=hub_env(cache), cwd=tmp_path)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert "not in the Hugging Face cache" in r.stderr and str(cache / tail) in r.stderr


def test_score_and_patch_by_hub_id(cached, tiny_model, tmp_path):
    """Same fingerprint however the model is named; out of place works; in place refused (shared blobs)."""
    from conftest import TEXTS

    cache, snap = cached
    data = tmp_path / "d.csv"
    data.write_text("prompt,response\n" + "".join(f"q{i},{t}\n" for i, t in enumerate(TEXTS[:8])))
    by_id, by_dir = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for model, out in (("org/tiny", by_id), (tiny_model(), by_dir)):
        r = cli(
            "score",
            model,
            data,
            "-o",
            out,
            "--nsamples",
            4,
            "--keep",
            0.05,
            "--device",
            "cpu",
            "--quiet",
            env=hub_env(cache),
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
    assert by_id.read_bytes() == by_dir.read_bytes()
    sel = ["--retain", by_id, "--couple", by_id, "--p", 0.01, "--q", 0.02]
    r = cli("patch", "org/tiny", tmp_path / "out", *sel, "--quiet", env=hub_env(cache), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    blobs = {p.name: p.read_bytes() for p in (snap.parent.parent / "blobs").iterdir()}
    r = cli("patch", "org/tiny", "--in-place", *sel, "--quiet", env=hub_env(cache), cwd=tmp_path)
    assert r.returncode == 1 and "symlink" in r.stderr
    assert {p.name: p.read_bytes() for p in (snap.parent.parent / "blobs").iterdir()} == blobs


def test_run_yaml_model_by_hub_id(cached, tmp_path):
    cache, snap = cached
    (tmp_path / "spin.yaml").write_text(
        "model: org/tiny@main\noutput: out\ncache_dir: cache\nretain: builtin:general\n"
        "couple: [builtin:privacy, builtin:fairness]\n"
        "score: {nsamples: 4, keep: 0.05, device: cpu, max_length: 64}\nselect: {p: 0.01, q: 0.02}\n"
    )
    r = cli("run", "spin.yaml", "--json", env=hub_env(cache), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"]
    (tmp_path / "spin.yaml").write_text((tmp_path / "spin.yaml").read_text().replace("org/tiny@main", "org/gone"))
    r = cli("run", "spin.yaml", env=hub_env(cache), cwd=tmp_path)
    assert r.returncode == 1 and "not in the Hugging Face cache" in r.stderr
