"""`spinctl report` and the report `spinctl run` writes: files, Markdown hashes, --card, no matplotlib, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from clirun import cli
from test_bad_inputs import assert_clean_failure

import spinctl

YAML = """\
model: model
output: out
cache_dir: cache
retain: builtin:general
couple: [builtin:privacy, builtin:fairness]
score: {nsamples: 8, keep: 0.05, max_length: 64, device: cpu}
select: {p: 0.01, q: 0.03}
"""
BUILTIN = Path(spinctl.__file__).parent / "builtin"


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run_out(tiny_model, tmp_path_factory):
    """One `spinctl run` on a tiny model (read-only for the tests: copy what you change)."""
    d = tmp_path_factory.mktemp("report-run")
    shutil.copytree(tiny_model("llama", "float32"), d / "model")
    (d / "spin.yaml").write_text(YAML)
    r = cli("run", d / "spin.yaml", "--json", "--set", "score.seed=0")
    assert r.returncode == 0, r.stderr
    return d, json.loads(r.stdout)


def report_args(d: Path, result: dict, patched: Path, out: Path) -> list:
    scores = [s["file"] for s in result["scores"]]
    args = ["report", patched, "-o", out, "--selection", result["selection"], "--retain", scores[0]]
    return args + [x for f in scores[1:] for x in ("--couple", f)]


def assert_hashes(md: str, d: Path, result: dict, manifest_sha: str) -> None:
    """Every hash the report promises, recomputed here from the files themselves."""
    assert sha(result["selection"]) in md
    assert manifest_sha in md
    for s in result["scores"]:
        assert sha(s["file"]) in md
    for name in ("general", "privacy", "fairness"):  # the data sha256 is of the data file's bytes
        assert sha(BUILTIN / f"{name}.jsonl") in md
    assert sha(d / "out" / "model.safetensors") in md
    assert f"spinctl {spinctl.__version__}" in md


def test_run_writes_the_report_beside_its_output(run_out):
    d, result = run_out
    rep = d / "out.report"
    assert result["report"]["output"] == str(rep) and result["report"]["card"] is None
    assert sorted(Path(f).name for f in result["report"]["files"]) == sorted(
        ["report.md", "report.json", "zeroed_heatmap.png", "score_distributions.png"]
    )  # no evals in this run: no bars
    assert sorted(p.name for p in rep.iterdir()) == sorted(Path(f).name for f in result["report"]["files"])
    md = (rep / "report.md").read_text()
    assert_hashes(md, d, result, sha(d / "out" / "spin-manifest.json"))
    assert "```yaml\n" + YAML + "```" in md and "--set score.seed=0" in md
    assert "No eval results were given" in md
    assert (rep / "zeroed_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((rep / "report.json").read_text())
    assert summary["zeroed"] == result["selected"] == sum(map(sum, summary["grid"]["zeroed"]))
    assert summary["grid"]["kinds"] == ["gate", "up", "down"]  # score.targets mlp


def test_report_command_with_evals_is_deterministic(run_out, tmp_path):
    d, result = run_out
    evals = []
    for model, rate, ppl in ((d / "model", 0.5, 10.0), (d / "out", 0.75, 10.5)):
        for kind, body in (
            ("aware", {"model": str(model), "n": 8, "aware": int(8 * rate), "rate": rate, "judge": "keyword"}),
            ("ppl", {"model": str(model), "file": "held.csv", "kind": "rows", "rows": 16, "tokens": 99, "ppl": ppl}),
        ):
            evals.append(tmp_path / f"{kind}-{model.name}.json")
            evals[-1].write_text(json.dumps(body))
    args = report_args(d, result, d / "out", tmp_path / "rep") + [x for e in evals for x in ("--eval", e)]
    r = cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert sorted(Path(f).name for f in out["files"]) == sorted(
        ["report.md", "report.json", "zeroed_heatmap.png", "score_distributions.png", "eval_bars.png"]
    )
    md = (tmp_path / "rep" / "report.md").read_text()
    assert_hashes(md, d, result, sha(d / "out" / "spin-manifest.json"))
    assert "| awareness | – | 0.5000 | 0.7500 | +0.2500 | 8 / 8 |" in md
    assert "| perplexity | held.csv | 10.0000 | 10.5000 | +5.00% | 16 / 16 |" in md
    assert "spinctl select --retain" in md and "--p 0.01 --q 0.03 --mode paper" in md  # no --config: the commands
    first = {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()}
    r = cli(*args, "--quiet")  # an earlier report is replaced, byte for byte the same
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == first
    assert "awareness" in r.stdout and "before / after" in r.stdout  # the rich tables


def test_awareness_rows_are_named_after_their_prompts_file(tmp_path):
    from spinctl.errors import InputError
    from spinctl.report.evals import before_after

    def aware(model, rate, **extra):
        return {"model": str(model), "n": 4, "aware": int(4 * rate), "rate": rate, "judge": "keyword", **extra}

    patched, original = tmp_path / "out", tmp_path / "model"
    builtin = str(BUILTIN / "eval_prompts.jsonl")  # the path `spinctl eval --prompts builtin:eval_prompts` records
    run = {"scores": [], "eval": [{"prompts": "builtin:eval_prompts", "patched": aware(patched, 0.75)}]}
    rows = before_after(
        [
            ("eval", aware(original, 0.5, prompts=builtin)),  # the same set as the run's: one row
            ("run", run),
            (
                "eval2",
                {
                    "original": aware(original, 0.25, prompts="/q/probe.csv"),
                    "compare": aware(patched, 1.0, prompts="/q/probe.csv"),
                },
            ),
            ("old", aware(patched, 0.0)),  # a result from before `prompts` was recorded: an unnamed set
        ],
        patched,
    )
    got = [(r["set"], r["before"], r["after"]) for r in rows]
    assert got == [("", None, 0.0), ("builtin:eval_prompts", 0.5, 0.75), ("probe.csv", 0.25, 1.0)]
    with pytest.raises(InputError, match="a second awareness on probe.csv result for the before model"):
        before_after(
            [("a", aware(original, 0.5, prompts="/q/probe.csv")), ("b", aware(original, 0.5, prompts="probe.csv"))],
            patched,
        )


def test_card_is_idempotent_recorded_verified_and_reverted(run_out, tmp_path):
    d, result = run_out
    patched = tmp_path / "out"
    shutil.copytree(d / "out", patched)
    (patched / "README.md").write_text("# Tiny model\n\nno newline at the end")
    original = (patched / "README.md").read_bytes()
    manifest_sha = sha(patched / "spin-manifest.json")
    args = report_args(d, result, patched, tmp_path / "rep") + ["--card", "--quiet"]
    assert cli(*args).returncode == 0
    once = (patched / "README.md").read_bytes()
    assert cli(*args).returncode == 0
    readme = (patched / "README.md").read_bytes()
    assert readme == once and readme.startswith(original) and readme.count(b"spinctl report: begin") == 1
    assert_hashes(readme.decode(), d, result, manifest_sha)  # the manifest as the patch wrote it
    assert "### Plots" not in readme.decode()
    rec = json.loads((patched / "spin-manifest.json").read_text())["other_files"]["README.md"]
    assert rec == {
        "input_sha256": hashlib.sha256(original).hexdigest(),
        "input_size": len(original),
        "output_sha256": sha(patched / "README.md"),
    }
    assert cli("verify", patched).returncode == 0

    assert cli("revert", patched, tmp_path / "restored").returncode == 0
    assert (tmp_path / "restored" / "README.md").read_bytes() == original
    assert cli("revert", patched, "--in-place").returncode == 0
    assert (patched / "README.md").read_bytes() == original
    assert sha(patched / "model.safetensors") == sha(d / "model" / "model.safetensors")


def test_card_without_a_readme_and_a_readme_edited_afterwards(run_out, tmp_path):
    d, result = run_out
    patched = tmp_path / "out"
    shutil.copytree(d / "out", patched)
    assert not (patched / "README.md").exists()
    args = report_args(d, result, patched, tmp_path / "rep") + ["--card", "--quiet"]
    assert cli(*args).returncode == 0 and (patched / "README.md").is_file()
    with open(patched / "README.md", "a") as f:
        f.write("edited\n")
    r = cli("verify", patched)
    assert r.returncode == 1 and "README.md" in r.stderr
    assert cli(*args).returncode == 0  # nothing of the original to lose: the section is rewritten
    assert cli("verify", patched).returncode == 0
    assert cli("revert", patched, "--in-place").returncode == 0
    assert not (patched / "README.md").exists()


def test_without_matplotlib_the_markdown_is_still_written(run_out, tmp_path, monkeypatch):
    from spinctl.config import ReportConfig
    from spinctl.report.write import write_report

    d, result = run_out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    scores = [Path(s["file"]) for s in result["scores"]]
    cfg = ReportConfig(tmp_path / "rep", d / "out", Path(result["selection"]), scores[0], tuple(scores[1:]))
    out = write_report(cfg, [])
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.json", "report.md"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert out["plots_skipped"] in md and "matplotlib is not installed" in md and ".png" not in md


def test_an_earlier_report_is_replaced_whole_also_through_a_symlink(run_out, tmp_path):
    from spinctl.config import ReportConfig
    from spinctl.report.write import write_report

    d, result = run_out
    scores = [Path(s["file"]) for s in result["scores"]]
    real, link = tmp_path / "real", tmp_path / "rep"
    real.mkdir()
    link.symlink_to(real)
    cfg = ReportConfig(link, d / "out", Path(result["selection"]), scores[0], tuple(scores[1:]))
    ppl = {"model": str(d / "out"), "file": "held.csv", "kind": "rows", "rows": 4, "tokens": 9, "ppl": 9.0}
    write_report(cfg, [("ppl", ppl)])
    assert "eval_bars.png" in os.listdir(real)
    write_report(cfg, [])  # no evals now: the earlier bars must not outlive their report
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(os.listdir(real)) == ["report.json", "report.md", "score_distributions.png", "zeroed_heatmap.png"]
    assert sorted(os.listdir(tmp_path)) == ["real", "rep"]  # nothing staged or set aside is left


BAD = {
    "missing selection": (lambda w: w.swap("--selection", w.tmp / "nope.safetensors"), ["nope.safetensors"]),
    "score files swapped": (lambda w: w.swap_scores(), ["not the retain score file", "sha256 differs"]),
    "one coupled file missing": (lambda w: w.drop_couple(), ["2 coupled score files, got 1"]),
    "another patch's selection": (lambda w: w.other_selection(), ["not the selection applied"]),
    "not a patched model": (lambda w: w.set_patched(w.d / "model"), ["no manifest"]),
    "eval not JSON": (lambda w: w.eval_file("{oops"), ["not valid JSON"]),
    "eval of unknown shape": (lambda w: w.eval_file('{"model": "m", "score": 1}'), ["not an eval result"]),
    "report dir holds other files": (lambda w: w.foreign_dir(), ["holds other files"]),
    "config not YAML": (lambda w: w.config("a: [unclosed"), ["not valid YAML"]),
}


class World:
    def __init__(self, d: Path, result: dict, tmp: Path):
        self.d, self.result, self.tmp = d, result, tmp
        self.patched = tmp / "out"
        shutil.copytree(d / "out", self.patched)
        self.args = report_args(d, result, self.patched, tmp / "rep")

    def swap(self, flag: str, value) -> None:
        self.args[self.args.index(flag) + 1] = value

    def swap_scores(self) -> None:
        i, j = self.args.index("--retain") + 1, self.args.index("--couple") + 1
        self.args[i], self.args[j] = self.args[j], self.args[i]

    def drop_couple(self) -> None:
        i = len(self.args) - 2
        del self.args[i : i + 2]

    def other_selection(self) -> None:
        scores = [s["file"] for s in self.result["scores"]]
        other = self.tmp / "other.safetensors"
        r = cli(
            "select",
            "--retain",
            scores[0],
            "--couple",
            scores[1],
            "--couple",
            scores[2],
            "--p",
            "0.02",
            "--q",
            "0.03",
            "-o",
            other,
        )
        assert r.returncode == 0, r.stderr
        self.swap("--selection", other)

    def set_patched(self, path: Path) -> None:
        self.args[1] = path

    def eval_file(self, text: str) -> None:
        (self.tmp / "e.json").write_text(text)
        self.args += ["--eval", self.tmp / "e.json"]

    def foreign_dir(self) -> None:
        (self.tmp / "rep").mkdir()
        (self.tmp / "rep" / "notes.txt").write_text("mine")

    def config(self, text: str) -> None:
        (self.tmp / "spin.yaml").write_text(text)
        self.args += ["--config", self.tmp / "spin.yaml"]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_fail_cleanly_and_write_nothing(run_out, tmp_path, case):
    make, expect = BAD[case]
    w = World(*run_out, tmp_path)
    make(w)
    before = {p: p.read_bytes() for p in w.patched.iterdir()}
    r = cli(*w.args, "--card")
    assert_clean_failure(r, expect)
    assert {p: p.read_bytes() for p in w.patched.iterdir()} == before  # the manifest, README: untouched
    rep = tmp_path / "rep"
    assert not rep.exists() or sorted(p.name for p in rep.iterdir()) == ["notes.txt"]


def test_card_refuses_a_readme_edited_in_its_original_part(run_out, tmp_path):
    w = World(*run_out, tmp_path)
    (w.patched / "README.md").write_text("# original\n")
    assert cli(*w.args, "--card", "--quiet").returncode == 0
    (w.patched / "README.md").write_text("# rewritten by hand\n")
    before = (w.patched / "spin-manifest.json").read_bytes()
    shutil.rmtree(tmp_path / "rep")
    r = cli(*w.args, "--card")
    assert_clean_failure(r, ["README.md", "no longer the original"])
    assert (w.patched / "README.md").read_text() == "# rewritten by hand\n"
    assert (w.patched / "spin-manifest.json").read_bytes() == before and not (tmp_path / "rep").exists()
    r = cli("revert", w.patched, "--in-place")  # nothing restored: the README's original is gone
    assert_clean_failure(r, ["README.md"])


def test_run_config_report_section(tmp_path):
    from spinctl.errors import InputError
    from spinctl.runconfig import load_run_config

    (tmp_path / "m.safetensors").write_bytes(b"")
    y = tmp_path / "spin.yaml"
    y.write_text("model: m.safetensors\nretain: r.csv\ncouple: [a.csv]\npatch: {in_place: true}\n")
    assert load_run_config(y).report.output == tmp_path / "m.safetensors.report"
    cfg = load_run_config(y, ["report.dir=rep", "report.bins=10"])
    assert (cfg.report.output, cfg.report.bins) == (tmp_path / "rep", 10)
    for bad in ("1", "10001", "10000000000000"):  # numpy would allocate 10**13 bin edges: a usage error instead
        with pytest.raises(InputError, match=r"report\.bins must be an integer in \[2, 10000\]"):
            load_run_config(y, [f"report.bins={bad}"])
    with pytest.raises(InputError, match=r"report\.card needs a model directory"):
        load_run_config(y, ["report.card=true"])
