"""Issue 11 item 10: safetensors sizes F4 and F6 tensors in bits (nbytes = numel · bits / 8).

A checkpoint holding them must open (inspect, fingerprint, patching of other tensors); the
sub-byte tensors themselves are never zeroed: selecting one is a clear error, exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from clirun import cli
from test_bad_inputs import assert_clean_failure, raw_safetensors, tree

from spinctl.errors import InputError
from spinctl.io.checkpoint import open_checkpoint
from spinctl.io.formats import read_selection, write_selection
from spinctl.patch import PatchConfig, patch
from spinctl.verify import verify

RNG = np.random.default_rng(0)
TENSORS = {  # name -> (dtype, shape, bytes): safetensors' own sizes, checked against safe_open below
    "a.weight": ("F32", [4, 8], 128),
    "b.weight": ("F4", [4, 8], 16),  # 32 elements x 4 bits
    "c.weight": ("F6_E2M3", [4, 4], 12),  # 16 x 6 bits
    "d.weight": ("F6_E3M2", [8], 6),
    "e.scale": ("F8_E8M0", [4], 4),
    "f.weight": ("BF16", [2, 4], 16),
}


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    raw_safetensors(d / "model.safetensors", {n: (dt, sh, RNG.bytes(nb)) for n, (dt, sh, nb) in TENSORS.items()})
    (d / "config.json").write_text("{}")
    return d


def _selection(model: Path, path: Path, picks: dict[str, list[int]]) -> Path:
    ck = open_checkpoint(model)
    shapes = {n: list(ck.tensors[n].shape) for n in picks}
    meta = {
        "mode": "paper",
        "p": 0.0,
        "q": 0.0,
        "retain_sha256": "0" * 64,
        "couple_sha256": ["0" * 64],
        "fingerprint": ck.fingerprint(),
        "shapes": shapes,
    }
    write_selection(path, {n: np.array(v, dtype=np.int64) for n, v in picks.items()}, meta)
    return path


def test_safetensors_itself_agrees(model):
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(TENSORS)


def test_opens_with_bit_sizes(model):
    ck = open_checkpoint(model)
    assert {n: (t.dtype, t.end - t.begin) for n, t in ck.tensors.items()} == {
        n: (dt, nb) for n, (dt, _, nb) in TENSORS.items()
    }
    assert len(ck.fingerprint()) == 64


def test_inspect_cli(model):
    r = cli("inspect", model, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (
        info["dtypes"]["F4"] == 1 and info["dtypes"]["F6_E2M3"] == 1 and info["parameters"] == 32 + 32 + 16 + 8 + 4 + 8
    )


def test_patch_of_other_tensors(model, tmp_path):
    sel = read_selection(_selection(model, tmp_path / "sel.safetensors", {"a.weight": [0, 5, 31], "f.weight": [1]}))
    out = tmp_path / "out"
    patch(PatchConfig(model, out), sel)
    assert verify(out)["ok"]
    before, after = open_checkpoint(model), open_checkpoint(out)
    raw_in, raw_out = (model / "model.safetensors").read_bytes(), (out / "model.safetensors").read_bytes()
    for name in ("b.weight", "c.weight", "d.weight", "e.scale"):
        t, u = before.tensors[name], after.tensors[name]
        assert raw_in[t.begin : t.end] == raw_out[u.begin : u.end], name
    a = np.frombuffer(raw_out[after.tensors["a.weight"].begin : after.tensors["a.weight"].end], np.float32)
    assert a[[0, 5, 31]].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["b.weight", "c.weight", "d.weight", "e.scale"])
def test_selected_subbyte_or_packed_is_refused(model, tmp_path, name):
    sel = _selection(model, tmp_path / "sel.safetensors", {"a.weight": [0], name: [1]})
    before = tree(tmp_path)
    r = cli("patch", model, tmp_path / "out", "-s", sel)
    assert_clean_failure(r, [name, TENSORS[name][0], "never zeroed"])
    assert tree(tmp_path) == before


def test_subbyte_tensor_off_a_byte_boundary(tmp_path):
    f = raw_safetensors(tmp_path / "odd.safetensors", {"x": ("F4", [3], b"\0\0")})
    with pytest.raises(InputError, match="x: .*12 bits.*whole number of bytes"):
        open_checkpoint(f)
