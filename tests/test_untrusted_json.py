"""Issue 11 item 6: deeply nested JSON (`[` x 100000) in any file spinctl parses is one clear line, exit 1.

Python's json raises RecursionError (not ValueError) past ~1000 levels, and each parse site
caught only ValueError: a traceback. Every case runs the real CLI on a copy of its inputs and
checks the directory tree is unchanged afterwards (no output, no temporary).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clirun import cli
from test_bad_inputs import World, assert_clean_failure, read_header, tree, write_raw

from spinctl.io.formats import read_selection
from spinctl.io.sidecars import encode_undo, read_undo
from spinctl.patch import PatchConfig, patch

DEEP = "[" * 100_000  # also unterminated: a parser that did not recurse would still say "invalid"


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory) -> World:
    return World(tiny_model, tmp_path_factory.mktemp("untrusted-json-world"))


def _run_clean(tmp: Path, argv: list, expect: list) -> None:
    before = tree(tmp)
    r = cli(*argv, cwd=tmp)
    assert_clean_failure(r, expect)
    assert tree(tmp) == before


def _deep_metadata(path: Path) -> None:
    """Replace a safetensors file's spinctl metadata string with deeply nested JSON."""
    header, data = read_header(path)
    header["__metadata__"]["spinctl"] = DEEP
    write_raw(path, json.dumps(header).encode(), data)


def test_safetensors_header(world, tmp_path):
    f = tmp_path / "model.safetensors"
    write_raw(f, DEEP.encode(), b"")
    _run_clean(tmp_path, ["inspect", f], [f, "nested too deeply"])


def test_model_index(world, tmp_path):
    m = world.model(tmp_path)
    (m / "model.safetensors.index.json").write_text(DEEP)
    _run_clean(tmp_path, world.patch_argv(tmp_path, m), [m / "model.safetensors.index.json", "nested too deeply"])


def test_score_metadata(world, tmp_path):
    r, c = world.file(tmp_path, "r"), world.file(tmp_path, "c")
    _deep_metadata(c)
    _run_clean(tmp_path, world.select_argv(tmp_path, r, c), [c, "nested too deeply"])


def test_exclude_score_metadata(world, tmp_path):
    """`--exclude SCORES` reads the score file's calibration facts (evaluation/heldout.py)."""
    from spinctl.errors import InputError
    from spinctl.evaluation.heldout import read_calibrated

    c = world.file(tmp_path, "c")
    _deep_metadata(c)
    with pytest.raises(InputError, match="not a spinctl score file"):
        read_calibrated(c)


def test_selection_metadata(world, tmp_path):
    m, sel = world.model(tmp_path), world.file(tmp_path, "sel")
    _deep_metadata(sel)
    _run_clean(tmp_path, ["patch", m, tmp_path / "out", "-s", sel], [sel, "nested too deeply"])


def _patched(world, tmp: Path) -> Path:
    out = tmp / "patched"
    patch(PatchConfig(world.sharded, out), read_selection(world.files["sel"]))
    return out


def test_manifest(world, tmp_path):
    d = _patched(world, tmp_path)
    (d / "spin-manifest.json").write_text(DEEP)
    _run_clean(tmp_path, ["verify", d], [d / "spin-manifest.json", "nested too deeply"])


def test_undo_metadata(world, tmp_path):
    d = _patched(world, tmp_path)
    undo = d / "spin-undo.safetensors"
    fp, entries = read_undo(undo)
    undo.write_bytes(encode_undo(entries, fp))
    _deep_metadata(undo)
    _run_clean(tmp_path, ["revert", d, tmp_path / "restored"], [undo])


def test_calibration_jsonl(world, tmp_path):
    data = tmp_path / "cal.jsonl"
    data.write_text(DEEP + "\n")
    _run_clean(
        tmp_path,
        ["score", world.f32, data, "-o", tmp_path / "s.safetensors", "--device", "cpu"],
        [data, "nested too deeply"],
    )


def test_eval_prompts_jsonl(world, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(DEEP + "\n")
    _run_clean(tmp_path, ["eval", world.f32, "--prompts", prompts, "--device", "cpu"], [prompts, "nested too deeply"])


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_model_json_read_by_transformers(world, tmp_path, name):
    m = Path(shutil.copytree(world.f32, tmp_path / "m"))
    (m / name).write_text(DEEP)
    data = tmp_path / "cal.jsonl"
    data.write_text(json.dumps({"prompt": "Alice found", "response": "the red box."}) + "\n")
    _run_clean(
        tmp_path, ["score", m, data, "-o", tmp_path / "s.safetensors", "--device", "cpu", "--nsamples", "1"], [m]
    )


def test_generation_config_read_by_eval(world, tmp_path):
    m = Path(shutil.copytree(world.f32, tmp_path / "m"))
    (m / "generation_config.json").write_text(DEEP)
    _run_clean(
        tmp_path,
        ["eval", m, "--prompts", "builtin:eval_prompts", "--limit", "1", "--device", "cpu"],
        [m, "nested too deeply"],
    )
