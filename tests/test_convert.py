"""spinctl convert / fetch / demo: bad inputs get one line and exit 1, before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clirun import cli

NO_DATA = {"SPINCTL_DATA": None}  # the demo must not find the developer's copy of the paper's CSVs


def _gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"PK\x03\x04 not gguf")
    r = cli("convert", str(f), str(tmp_path / "out"), env=NO_DATA)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    r = cli("convert", str(tmp_path / "nope.gguf"), str(tmp_path / "out"), env=NO_DATA)
    assert r.returncode == 1 and "no such GGUF file" in r.stderr


def test_unsupported_architecture(tmp_path):
    r = cli("convert", str(_gguf(tmp_path / "b.gguf", "bert")), str(tmp_path / "out"), env=NO_DATA)
    assert r.returncode == 1 and "architecture 'bert' cannot be converted" in r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path):
    full = _gguf(tmp_path / "l.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:40])
    r = cli("convert", str(cut), str(tmp_path / "out"), env=NO_DATA)
    assert r.returncode == 1 and "cannot read the GGUF file" in r.stderr and "Traceback" not in r.stderr


def test_existing_output_and_bad_dtype(tmp_path):
    f = _gguf(tmp_path / "l.gguf", "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    r = cli("convert", str(f), str(tmp_path / "out"), env=NO_DATA)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert cli("convert", str(f), str(tmp_path / "o2"), "--dtype", "int8", env=NO_DATA).returncode == 2


def test_fetch_unknown_model():
    r = cli("fetch", "gpt-17", env=NO_DATA)
    assert r.returncode == 1 and "unknown model 'gpt-17'" in r.stderr


@pytest.mark.parametrize("given", [None, "missing"])
def test_demo_needs_the_data(tmp_path, given):
    args = ["demo", "--workdir", str(tmp_path / "w")]
    if given:
        (tmp_path / "missing").mkdir()
        args += ["--data-dir", str(tmp_path / "missing")]
    r = cli(*args, env=NO_DATA)
    assert r.returncode == 1
    assert ("--data-dir" in r.stderr) if given is None else ("not found" in r.stderr)
