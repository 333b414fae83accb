"""`spinctl run`: the YAML schema, the score cache, and the whole pipeline on a tiny model."""

import json
import subprocess
import sys

import pytest

from spinctl.errors import InputError
from spinctl.runconfig import load_run_config

YAML = """\
model: model
output: {output}
cache_dir: cache
retain: builtin:general
couple: [builtin:privacy, builtin:fairness]
score: {{nsamples: 8, keep: 0.05, max_length: 64, device: cpu}}
select: {{p: 0.01, q: 0.03, mode: reference}}
"""


def spinctl(*args):
    return subprocess.run([sys.executable, "-m", "spinctl", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def workdir(tiny_model, tmp_path):
    import shutil

    shutil.copytree(tiny_model("llama", "float32", "100KB"), tmp_path / "model")
    (tmp_path / "spin.yaml").write_text(YAML.format(output="out1"))
    return tmp_path


def test_pipeline_then_cache_hits(workdir):
    r = spinctl("run", workdir / "spin.yaml", "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["verified"] and first["selected"] > 0 and first["eval"] is None
    assert [s["cached"] for s in first["scores"]] == [False, False, False]
    assert set(first["seconds"]) == {"score", "select", "patch", "verify"}
    assert spinctl("verify", workdir / "out1").returncode == 0

    r = spinctl("run", workdir / "spin.yaml", "--set", "output=out2", "--json")
    second = json.loads(r.stdout)
    assert [s["cached"] for s in second["scores"]] == [True, True, True]
    assert [s["file"] for s in second["scores"]] == [s["file"] for s in first["scores"]]
    assert second["selected"] == first["selected"]

    r = spinctl("run", workdir / "spin.yaml", "--set", "output=out3", "--set", "score.seed=1", "--json")
    assert [s["cached"] for s in json.loads(r.stdout)["scores"]] == [False, False, False]


def test_existing_output_fails_before_scoring(workdir):
    (workdir / "out1").mkdir()
    (workdir / "out1" / "x").write_text("keep me")
    r = spinctl("run", workdir / "spin.yaml")
    assert r.returncode == 1 and "not empty" in r.stderr and not (workdir / "cache").exists()


@pytest.mark.parametrize("text,word", [
    (YAML.replace("select:", "selct:"), "'selct'"),
    (YAML.replace("nsamples", "nsample"), "'nsample'"),
    (YAML.replace("retain: builtin:general\n", ""), "'retain'"),
    (YAML.replace("couple: [builtin:privacy, builtin:fairness]", "couple: builtin:privacy"), "couple"),
    ("model: [unclosed", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, word):
    (tmp_path / "spin.yaml").write_text(text.format(output="o") if "{output}" in text else text)
    r = spinctl("run", tmp_path / "spin.yaml")
    assert r.returncode == 1 and word in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_paths_relative_to_yaml_and_overrides(tmp_path):
    (tmp_path / "spin.yaml").write_text(YAML.format(output="out"))
    cfg = load_run_config(tmp_path / "spin.yaml", ["score.nsamples=16", "select.p=0.02"])
    assert cfg.model == tmp_path / "model" and cfg.output == tmp_path / "out"
    assert cfg.retain == "builtin:general" and cfg.score["nsamples"] == 16 and cfg.select["p"] == 0.02
    with pytest.raises(InputError, match="KEY=VALUE"):
        load_run_config(tmp_path / "spin.yaml", ["nonsense"])
    with pytest.raises(InputError, match="'scor'"):
        load_run_config(tmp_path / "spin.yaml", ["scor.nsamples=3"])
