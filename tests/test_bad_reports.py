"""`spinctl report` on bad input: one line on stderr, exit 1 (2 for an option out of range), and nothing
written or changed: not the patched model (its manifest, its README.md), not the report directory.

What went wrong before: `--card` onto a README.md that is a directory failed after the report and the
manifest's record were written (verify then failed); malformed eval JSON crashed with a traceback, after
the report was written and the tables half printed; `--bins 10**13` asked numpy for 73 TiB; a FIFO given
as the selection, an eval result or the spin.yaml blocked forever.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

import pytest
from clirun import cli
from test_bad_inputs import assert_clean_failure
from test_report import World, run_out  # noqa: F401 - run_out: the fixture

from spinctl.errors import InputError

FIFO_WAIT = 60  # seconds: a report refused up front takes a few; one blocked on a FIFO never ends


def tree(root: Path) -> dict:
    """Every entry under root, as what it is: bytes of a file, a symlink's target, a directory, a FIFO."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif p.is_file():
                out[rel] = ("file", p.read_bytes())
            else:
                out[rel] = ("special",)
    return out


@pytest.fixture
def w(run_out, tmp_path):  # noqa: F811
    return World(*run_out, tmp_path)


def assert_nothing_changed(w: World, before: dict) -> None:
    assert tree(w.patched) == before, "the patched model (manifest, README.md) must be left as it was"
    assert not (w.tmp / "rep").exists(), "no report may be written"


# ---- --card: every check before anything is written; a failure while writing puts everything back ----

README_KINDS = {
    "a directory": (lambda p: (p / "README.md").mkdir(), "is a directory"),
    "a FIFO": (lambda p: os.mkfifo(p / "README.md"), "not a regular file"),
    "a dangling symlink": (lambda p: (p / "README.md").symlink_to(p / "gone.md"), "symlink to nothing"),
}


@pytest.mark.parametrize("kind", sorted(README_KINDS))
def test_card_onto_a_readme_that_is_not_a_file_changes_nothing(w, kind):
    make, reason = README_KINDS[kind]
    make(w.patched)
    before = tree(w.patched)
    r = cli(*w.args, "--card", timeout=FIFO_WAIT)
    assert_clean_failure(r, ["README.md", reason])
    assert_nothing_changed(w, before)  # the manifest's bytes included: no record of a README never written
    r = cli("verify", w.patched)
    assert r.returncode == 0, r.stderr


def _cfg(w: World, card: bool = True):
    from spinctl.config import ReportConfig

    scores = [Path(s["file"]) for s in w.result["scores"]]
    return ReportConfig(w.tmp / "rep", w.patched, Path(w.result["selection"]), scores[0], tuple(scores[1:]), card=card)


def _earlier_report_and_readme(w: World) -> tuple[dict, dict]:
    """An earlier report in rep/ and a README.md of the model's own; (the report's files, the model's tree)."""
    from spinctl.report.write import write_report

    write_report(_cfg(w, card=False), [])
    (w.patched / "README.md").write_text("# the model's own card\n")
    return tree(w.tmp / "rep"), tree(w.patched)


def _no_leftovers(w: World) -> None:
    assert sorted(p.name for p in w.tmp.iterdir()) == ["out", "rep"], "nothing staged or set aside is left"
    assert not [p for p in w.patched.iterdir() if p.name.startswith(".")], "no temporary file is left"


def test_a_card_that_fails_while_writing_the_readme_changes_nothing(w, monkeypatch):
    from spinctl.io import nonweight_edits
    from spinctl.report.write import write_report

    report, before = _earlier_report_and_readme(w)
    real = nonweight_edits.atomic_write_bytes

    def full_disk(path, data):
        if Path(path).name == "README.md":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(nonweight_edits, "atomic_write_bytes", full_disk)  # the manifest is written, then this
    with pytest.raises(OSError, match="No space left"):
        write_report(_cfg(w), [])
    assert tree(w.patched) == before  # the manifest's new record taken back, the README as it was
    assert tree(w.tmp / "rep") == report  # the earlier report, not the new one
    _no_leftovers(w)
    monkeypatch.undo()
    r = cli("verify", w.patched)
    assert r.returncode == 0, r.stderr


def test_a_report_that_fails_after_the_card_takes_the_card_back(w, monkeypatch):
    import spinctl.report.write as write

    report, before = _earlier_report_and_readme(w)
    real = write.staged_dir

    @contextlib.contextmanager
    def fails_to_rename(final, replace=False):
        with real(final, replace) as tmp:
            yield tmp
            raise OSError(errno.EIO, "Input/output error", str(final))  # as the rename into place would

    monkeypatch.setattr(write, "staged_dir", fails_to_rename)
    with pytest.raises(OSError, match="Input/output error"):
        write.write_report(_cfg(w), [])
    assert tree(w.patched) == before
    assert tree(w.tmp / "rep") == report
    _no_leftovers(w)


# ---- eval results: checked whole when read, before anything is written ----

AWARE = {"model": "m", "prompts": "p.csv", "n": 4, "aware": 2, "rate": 0.5, "judge": "keyword"}
PAIRS = {"model": "m", "pair_sets": [{"name": "safe.csv", "accuracy": 0.5, "n": 4}]}
PPL = {"model": "m", "file": "held.csv", "kind": "rows", "rows": 4, "tokens": 9, "ppl": 3.0}

BAD_EVALS = {
    "pair-set name a number": (
        '{"model": "m", "pair_sets": [{"name": 5, "accuracy": 0.5, "n": 4}]}',
        "pair_sets[0].name",
    ),
    "pair-set name a list": (
        '{"model": "m", "pair_sets": [{"name": [1], "accuracy": 0.5, "n": 4}]}',
        "pair_sets[0].name",
    ),
    "pair set a string": ('{"model": "m", "pair_sets": ["abc"]}', "pair_sets[0] must be an object"),
    "pair_sets an object": ('{"model": "m", "pair_sets": {"a": 1}}', "pair_sets must be a list"),
    "accuracy above 1": ('{"model": "m", "pair_sets": [{"name": "s", "accuracy": 1.5, "n": 4}]}', "accuracy"),
    "rate of 400 nines": (json.dumps(AWARE).replace("0.5", "9" * 400), "rate must be a finite number"),
    "rate NaN": (json.dumps(AWARE | {"rate": float("nan")}), "rate must be a finite number"),
    "rate a string": (json.dumps(AWARE | {"rate": "high"}), "rate must be a finite number"),
    "rate true": (json.dumps(AWARE | {"rate": True}), "rate must be a finite number"),
    "n negative": (json.dumps(AWARE | {"n": -5}), "n must be a non-negative integer"),
    "n missing": (json.dumps({k: v for k, v in AWARE.items() if k != "n"}), "n must be a non-negative integer"),
    "model with NUL": (json.dumps(AWARE | {"model": "pat\0ched"}), "model must be a non-empty string"),
    "model a number": (json.dumps(AWARE | {"model": 5}), "model must be a non-empty string"),
    "prompts a number": (json.dumps(AWARE | {"prompts": 5}), "prompts must be a non-empty string"),
    "ppl zero": (json.dumps(PPL | {"ppl": 0}), "ppl must be a finite number"),
    "ppl infinite": (json.dumps(PPL | {"ppl": float("inf")}), "ppl must be a finite number"),
    "ppl file null": (json.dumps(PPL | {"file": None}), "file must be a non-empty string"),
    "ppl tokens a string": (json.dumps(PPL | {"rows": 0, "tokens": "x"}), "tokens must be a non-negative integer"),
    "run rows not objects": ('{"scores": [], "eval": [5]}', "eval[0] of a run result must be an object"),
    "run eval an object": ('{"scores": [], "eval": {"a": 1}}', "eval of a run result must be a list"),
    "run result not an object": (
        '{"scores": [], "eval": [{"prompts": "p.csv", "patched": "x"}]}',
        "eval[0].patched is not an eval result",
    ),
    "compare a list": ('{"original": ' + json.dumps(AWARE) + ', "compare": []}', "compare is not an eval result"),
    "a compare's rate": (
        json.dumps({"original": AWARE, "compare": AWARE | {"rate": 2}}),
        "compare.rate must be a finite number in [0, 1]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_EVALS))
def test_a_malformed_eval_result_is_refused_when_read(tmp_path, case):
    from spinctl.report.evals import read_eval_file

    text, reason = BAD_EVALS[case]
    path = tmp_path / "e.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        read_eval_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and reason in msg, msg
    assert len(msg.splitlines()) == 1 and len(msg) < 300, msg
    assert "string indices" not in msg and "lacks" not in msg, msg  # Python's own words are no reason


def test_the_eval_results_spinctl_writes_are_read():
    from spinctl.report.evals import _flatten

    run = {"scores": [], "eval": [{"prompts": "p.csv", "original": AWARE, "patched": AWARE | {"model": "out"}}]}
    text_ppl = {k: v for k, v in PPL.items() if k != "rows"} | {"kind": "text"}  # no rows: the tokens count
    for data, n in (
        (AWARE, 1),
        (AWARE | {"rate": None}, 0),  # every answer unjudgeable: nothing to show
        ({k: v for k, v in AWARE.items() if k != "prompts"}, 1),  # older results: an unnamed set
        (PAIRS, 1),
        (PPL, 1),
        (text_ppl, 1),
        ({"original": AWARE, "compare": AWARE | {"model": "out"}}, 2),
        ({"awareness": AWARE, "preference": PAIRS}, 2),
        (run, 2),
        ({"scores": [], "eval": None}, 0),
    ):
        assert len(_flatten(data, "e.json")) == n, data
    assert _flatten(text_ppl, "e.json")[0]["n"] == 9


def test_a_malformed_eval_result_with_card_writes_nothing(w):
    (w.tmp / "e.json").write_text('{"model": "m", "pair_sets": [{"name": 5, "accuracy": 0.5, "n": 4}]}')
    before = tree(w.patched)
    r = cli(*w.args, "--card", "--eval", w.tmp / "e.json")
    assert_clean_failure(r, ["e.json", "pair_sets[0].name"])
    assert_nothing_changed(w, before)


def test_names_are_shown_as_they_are_in_the_terminal_and_the_markdown(w):
    name = "[/x] a|b"  # rich markup that closes nothing; a Markdown cell separator
    (w.tmp / "e.json").write_text(json.dumps(PAIRS | {"pair_sets": [{"name": name, "accuracy": 0.5, "n": 4}]}))
    r = cli(*w.args, "--eval", w.tmp / "e.json")
    assert r.returncode == 0, r.stderr
    assert "[/x]" in r.stdout  # escaped for rich, so printed, not a MarkupError half-way
    assert "| preference accuracy | [/x] a\\|b | 0.5000 |" in (w.tmp / "rep" / "report.md").read_text()


# ---- --bins: a usage error past 10000, like any option out of range ----


@pytest.mark.parametrize("bins", ["1", "10001", "10000000000000"])
def test_bins_out_of_range_is_a_usage_error(tmp_path, bins):
    args = ["report", "patched", "-o", "rep", "-s", "sel.safetensors", "--retain", "r.safetensors", "--couple", "c"]
    r = cli(*args, "--bins", bins, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "--bins" in r.stderr and "[2, 10000]" in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())


def test_bins_range_in_the_config():
    from spinctl.config import OptionError, ReportConfig

    p = Path("x")
    assert ReportConfig(p, p, p, p, (p,), bins=10_000).bins == 10_000
    with pytest.raises(OptionError, match=r"--bins 10000000000000: must be an integer in \[2, 10000\]"):
        ReportConfig(p, p, p, p, (p,), bins=10**13)


# ---- FIFOs: refused before anything opens them ----


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


FIFOS = {
    "selection": lambda w: w.swap("--selection", _fifo(w.tmp / "sel.safetensors")),
    "eval result": lambda w: w.args.extend(["--eval", _fifo(w.tmp / "e.json")]),
    "config": lambda w: w.args.extend(["--config", _fifo(w.tmp / "spin.yaml")]),
    "score file": lambda w: w.swap("--retain", _fifo(w.tmp / "retain.safetensors")),
}


@pytest.mark.parametrize("case", sorted(FIFOS))
def test_a_fifo_as_an_input_is_refused(w, case):
    FIFOS[case](w)
    before = tree(w.patched)
    r = cli(*w.args, "--card", timeout=FIFO_WAIT)
    assert_clean_failure(r, ["not a regular file"])
    assert_nothing_changed(w, before)


def test_a_fifo_as_the_manifest_is_refused(w):
    (w.patched / "spin-manifest.json").unlink()
    _fifo(w.patched / "spin-manifest.json")
    before = tree(w.patched)
    r = cli(*w.args, timeout=FIFO_WAIT)
    assert_clean_failure(r, ["spin-manifest.json", "not a regular file"])
    assert_nothing_changed(w, before)


def test_a_fifo_in_the_report_directory_is_not_replaced(w):
    (w.tmp / "rep").mkdir()
    _fifo(w.tmp / "rep" / "report.md")  # an earlier report's name, but no report wrote it
    r = cli(*w.args, timeout=FIFO_WAIT)
    assert_clean_failure(r, ["holds other files"])
    assert tree(w.tmp / "rep") == {"report.md": ("special",)}
