"""`spinctl run`: the YAML schema, the score cache, and the whole pipeline on a tiny model."""

import json
import subprocess

import pytest
from clirun import cli

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


@pytest.fixture
def workdir(tiny_model, tmp_path):
    import shutil

    shutil.copytree(tiny_model("llama", "float32", "100KB"), tmp_path / "model")
    (tmp_path / "spin.yaml").write_text(YAML.format(output="out1"))
    return tmp_path


def test_pipeline_then_cache_hits(workdir):
    r = cli("run", workdir / "spin.yaml", "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["verified"] and first["selected"] > 0 and first["eval"] is None
    assert [s["cached"] for s in first["scores"]] == [False, False, False]
    assert set(first["seconds"]) == {"score", "select", "patch", "verify", "report"}
    assert cli("verify", workdir / "out1").returncode == 0

    r = cli("run", workdir / "spin.yaml", "--set", "output=out2", "--json")
    second = json.loads(r.stdout)
    assert [s["cached"] for s in second["scores"]] == [True, True, True]
    assert [s["file"] for s in second["scores"]] == [s["file"] for s in first["scores"]]
    assert second["selected"] == first["selected"]

    r = cli("run", workdir / "spin.yaml", "--set", "output=out3", "--set", "score.seed=1", "--json")
    assert [s["cached"] for s in json.loads(r.stdout)["scores"]] == [False, False, False]


def test_stream_run_never_loads_the_whole_model(workdir, monkeypatch):
    """score.stream: true reads one layer at a time; `run` once loaded the whole model first anyway."""
    import spinctl.runtime
    from spinctl.run import run

    def refuse(*a, **k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(spinctl.runtime, "load_model", refuse)
    cfg = load_run_config(workdir / "spin.yaml", ["score.stream=true", "score.nsamples=4"])
    assert run(cfg)["verified"]


def test_existing_output_fails_before_scoring(workdir):
    (workdir / "out1").mkdir()
    (workdir / "out1" / "x").write_text("keep me")
    r = cli("run", workdir / "spin.yaml")
    assert r.returncode == 1 and "not empty" in r.stderr and not (workdir / "cache").exists()


@pytest.mark.parametrize(
    "text,word",
    [
        (YAML.replace("select:", "selct:"), "'selct'"),
        (YAML.replace("nsamples", "nsample"), "'nsample'"),
        (YAML.replace("retain: builtin:general\n", ""), "'retain'"),
        (YAML.replace("couple: [builtin:privacy, builtin:fairness]", "couple: builtin:privacy"), "couple"),
        ("model: [unclosed", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, word):
    (tmp_path / "spin.yaml").write_text(text.format(output="o") if "{output}" in text else text)
    r = cli("run", tmp_path / "spin.yaml")
    assert r.returncode == 1 and word in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_paths_relative_to_yaml_and_overrides(tmp_path):
    (tmp_path / "spin.yaml").write_text(YAML.format(output="out"))
    cfg = load_run_config(tmp_path / "spin.yaml", ["score.nsamples=16", "select.p=0.02"])
    assert cfg.model == tmp_path / "model" and cfg.output == tmp_path / "out"
    assert cfg.retain == "builtin:general" and cfg.score.nsamples == 16 and cfg.select.p == 0.02
    with pytest.raises(InputError, match="KEY=VALUE"):
        load_run_config(tmp_path / "spin.yaml", ["nonsense"])
    with pytest.raises(InputError, match="'scor'"):
        load_run_config(tmp_path / "spin.yaml", ["scor.nsamples=3"])


# ---- issue 11 item 7: every value type- and range-checked at load, naming the key ----

BASE = "model: m\noutput: o\nretain: r.csv\ncouple: [c.csv]\n"


@pytest.mark.parametrize(
    "extra,key",
    [
        ("select: {p: abc}", "select.p"),
        ("select: {q: 2}", "select.q"),
        ("select: {p: .nan}", "select.p"),
        ("select: {mode: bogus}", "select.mode"),
        ("score: {device: 5}", "score.device"),
        ("score: {device: tpu}", "score.device"),
        ("score: {targets: 5}", "score.targets"),
        ("score: {targets: 're:('}", "score.targets"),
        ("score: {nsamples: 0}", "score.nsamples"),
        ("score: {nsamples: true}", "score.nsamples"),
        ("score: {nsamples: 1.5}", "score.nsamples"),
        ("score: {keep: 0}", "score.keep"),
        ("score: {batch_size: big}", "score.batch_size"),
        ("score: {method: bogus}", "score.method"),
        ("score: {dtype: int8}", "score.dtype"),
        ("score: {stream: 'yes please'}", "score.stream"),
        ("score: {prompt_column: [a]}", "score.prompt_column"),
        ("eval: {prompts: p.csv, limit: abc}", "eval.limit"),
        ("eval: {prompts: p.csv, limit: 0}", "eval.limit"),
        ("eval: {prompts: p.csv, judge: gpt}", "eval.judge"),
        ("eval: {prompts: [p.csv, 5]}", "eval.prompts"),
        ("eval: {prompts: p.csv, max_new_tokens: -1}", "eval.max_new_tokens"),
        ("patch: {in_place: 'false'}", "patch.in_place"),
        ("patch: {link: 1}", "patch.link"),
        ("model: [a, b]", "model"),
        ("cache_dir: 5", "cache_dir"),
    ],
)
def test_bad_value_names_the_key(tmp_path, extra, key):
    body = BASE if extra.startswith("model:") is False else BASE.replace("model: m\n", "")
    (tmp_path / "spin.yaml").write_text(body + extra + "\n")
    with pytest.raises(InputError) as e:
        load_run_config(tmp_path / "spin.yaml")
    assert f" {key} " in f" {e.value} ".replace(":", " "), str(e.value)


def test_in_place_given_as_a_string_never_patches_in_place(tmp_path):
    # 'false' is a non-empty string: truthy. It used to turn `output:` off and patch the model itself.
    (tmp_path / "spin.yaml").write_text(BASE + "patch: {in_place: 'false'}\n")
    with pytest.raises(InputError, match="patch.in_place"):
        load_run_config(tmp_path / "spin.yaml")


def test_override_values_are_checked_too(tmp_path):
    (tmp_path / "spin.yaml").write_text(BASE)
    with pytest.raises(InputError, match="select.p"):
        load_run_config(tmp_path / "spin.yaml", ["select.p=abc"])


def test_good_values_are_normalised(tmp_path):
    # PyYAML reads 5e-7 (no dot) as a string: it is the documented default and must keep working.
    (tmp_path / "spin.yaml").write_text(
        BASE.replace("[c.csv]", "[a.csv, b.csv]") + "select: {p: 5e-7, q: 1e-6, mode: reference}\n"
        "score: {keep: 1e-4, batch_size: auto, device: 'cuda:1', stream: true}\n"
        "eval: {prompts: p.csv, limit: null}\n"
    )
    cfg = load_run_config(tmp_path / "spin.yaml")
    assert (cfg.select.p, cfg.select.q, cfg.select.mode.value) == (5e-7, 1e-6, "reference")
    assert cfg.score.keep == 1e-4 and cfg.score.batch_size is None and cfg.score.device == "cuda:1"


# Nine anchors under nine valid keys, each nine aliases of the one before: 9^9 strings from ~600 bytes.
BOMB_KEYS = ("method", "nsamples", "seed", "keep", "targets", "max_length", "batch_size", "device", "dtype")
BOMB = (
    "score:\n  method: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"  {k}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for k, p, n in zip(BOMB_KEYS[1:], "abcdefgh", "bcdefghi"))
    + "model: *i\n"
)


def test_alias_bomb_refused_fast(tmp_path):
    """The billion laughs (9^9 strings from ~600 bytes) once ran 99 s into a MemoryError."""
    import resource

    (tmp_path / "spin.yaml").write_text(BOMB + "retain: r\ncouple: [c]\noutput: o\n")
    assert len(BOMB) < 700

    def limit():  # a regression must not eat the shared machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    try:
        r = cli("run", tmp_path / "spin.yaml", timeout=30, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        pytest.fail("alias bomb not refused within 30 s")
    assert r.returncode == 1 and "alias" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_small_aliases_still_allowed(tmp_path):
    (tmp_path / "spin.yaml").write_text("model: m\noutput: o\nretain: &r r.csv\ncouple: [*r, c.csv]\n")
    assert load_run_config(tmp_path / "spin.yaml").couple[0].endswith("r.csv")


def test_deeply_nested_yaml_is_one_line(tmp_path):
    """Issue 11 item 6: `[` x 100000 in spin.yaml was a RecursionError traceback."""
    (tmp_path / "spin.yaml").write_text("model: " + "[" * 100000 + "\n")
    r = cli("run", tmp_path / "spin.yaml")
    assert r.returncode == 1 and "nested too deeply" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    "extra,says",
    [
        ("eval: {prompts: [nope.csv]}", "nope.csv not found"),
        ("eval: {prompts: [q.patched.csv], save: q.csv}", "q.patched.csv: is an input of this command"),
        ("eval: {prompts: [q.csv], save: nodir/a.jsonl}", "its directory does not exist"),
        ("eval: {prompts: [q.csv], judge: model, judge_model: model, judge_template: nope.txt}", "nope.txt not found"),
        ("report: {dir: out1}", "report.dir must be outside"),
        ("report: {dir: q.csv/r}", "q.csv is not a directory"),
    ],
)
@pytest.mark.parametrize("in_place", [False, True])
def test_eval_and_report_problems_fail_before_any_work(workdir, extra, says, in_place):
    """Once failed after patching (in place, too): now before scoring, with the model untouched."""
    from test_bad_inputs import tree

    for name in ("q.csv", "q.patched.csv"):
        (workdir / name).write_text("questions\nWhere does my neighbour live?\n")
    yaml = YAML.format(output="out1") + extra + "\n"
    if in_place:
        yaml = yaml.replace("output: out1\n", "patch: {in_place: true}\n").replace("dir: out1", "dir: model/r")
    (workdir / "spin.yaml").write_text(yaml)
    before = tree(workdir)
    r = cli("run", workdir / "spin.yaml")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert tree(workdir) == before  # no cache, no output, no report, the model byte for byte


def test_a_missing_model_is_named_as_such(workdir):
    """Once reported as "output must be outside the input model directory"."""
    (workdir / "spin.yaml").write_text(YAML.format(output="out1").replace("model: model", "model: nomodel"))
    r = cli("run", workdir / "spin.yaml")
    assert r.returncode == 1 and "nomodel" in r.stderr and "outside" not in r.stderr, r.stderr


def test_eval_answers_are_saved_per_model(workdir):
    """eval.save: one file per model evaluated, never the second over the first."""
    (workdir / "q.csv").write_text("questions\nWhere does my neighbour live?\nWhat is her phone number?\n")
    extra = "eval: {prompts: [q.csv], save: answers.jsonl, max_new_tokens: 2, device: cpu}\n"
    (workdir / "spin.yaml").write_text(YAML.format(output="out1") + extra)
    r = cli("run", workdir / "spin.yaml", "--json")
    assert r.returncode == 0, r.stderr
    for label in ("original", "patched"):
        lines = (workdir / f"answers.{label}.jsonl").read_text().splitlines()
        assert [json.loads(x)["question"] for x in lines] == [
            "Where does my neighbour live?",
            "What is her phone number?",
        ]
    assert not (workdir / "answers.jsonl").exists()
