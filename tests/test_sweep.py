"""`spinctl sweep`: numbers equal those of the patched checkpoint on disk, exact restore, best-setting rule, outputs, bad inputs."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from clirun import cli
from conftest import TEXTS
from pairdata import PROMPTS, SAFE, UNSAFE, score_file, write_csv

from spinctl.errors import SpinctlError
from spinctl.evaluation.sweep import (
    Setting,
    SweepConfig,
    parse_budget,
    pick_best,
    run_sweep,
    selection_for,
    sweep_model,
    zeroed,
)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A tiny Llama, a general CSV, two pair sets, and score files calibrated on general / priv_safe / fair_safe."""
    tmp = tmp_path_factory.mktemp("sweep")
    model = tiny_model("llama")
    general = write_csv(tmp / "general.csv", [(t.split(",")[0], t.split(",", 1)[1]) for t in TEXTS[:40]])
    priv = (
        write_csv(tmp / "priv_safe.csv", list(zip(PROMPTS, SAFE))),
        write_csv(tmp / "priv_unsafe.csv", list(zip(PROMPTS, UNSAFE))),
    )
    fair = (
        write_csv(tmp / "fair_safe.csv", list(zip(PROMPTS[::-1], SAFE[::-1])) + [("extra", "x")]),
        write_csv(tmp / "fair_unsafe.csv", list(zip(PROMPTS, UNSAFE))),
    )
    retain = score_file(model, tmp / "retain.safetensors", general, nsamples=8, score_seed=1)
    a = score_file(model, tmp / "a.safetensors", priv[0], nsamples=2, seed=1, score_seed=2)
    b = score_file(model, tmp / "b.safetensors", fair[0], nsamples=2, seed=2, score_seed=3, method="snip")
    questions = write_csv(tmp / "questions.csv", [(q,) for q in PROMPTS], header=("questions",))
    return dict(
        tmp=tmp, model=model, general=general, priv=priv, fair=fair, retain=retain, a=a, b=b, questions=questions
    )


def config(s, **kw) -> SweepConfig:
    base = dict(
        model=s["model"],
        retain=s["retain"],
        couple=(s["a"], s["b"]),
        p=(0.01,),
        q=(0.05,),
        pairs=(s["priv"], s["fair"]),
        ppl_data=s["general"],
        ppl_rows=16,
        device="cpu",
        dtype="float32",
        batch_size=4,
        resamples=500,
    )
    return SweepConfig(**{**base, **kw})


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "seconds"}


# ---------------------------------------------------------------- the sweep equals the patched checkpoint


def test_sweep_equals_patched_checkpoint(setup, tmp_path):
    """Every setting's ppl, accuracies, intervals, margins and judged rates equal those measured from the
    checkpoint `spinctl patch` writes with the same settings (bit-equal: same batching, CPU)."""
    from spinctl.evaluation.evaluate import EvalConfig, evaluate
    from spinctl.evaluation.ppl import perplexity
    from spinctl.evaluation.preference import PreferenceConfig, run_preference
    from spinctl.io.formats import SelectionFile
    from spinctl.patch import PatchConfig, patch
    from spinctl.selection import SelectConfig, run_select

    s = setup
    cfg = config(
        s,
        modes=("paper", "reference"),
        targets=("all", "mlp"),
        judge_prompts=(s["questions"],),
        judge_limit=3,
        max_new_tokens=6,
    )
    result = run_sweep(cfg)
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["original"] + [g.label for g in cfg.grid()] and len(rows) == 5
    assert all(r["zeroed"] > 0 for r in rows[1:]) and rows[0]["zeroed"] == 0
    assert rows[1]["zeroed"] > rows[2]["zeroed"]  # all targets ⊃ mlp only
    for row in rows:
        out = tmp_path / f"patched-{len(list(tmp_path.iterdir()))}"
        if row["mode"] is None:
            out = s["model"]
        else:
            indices, meta = run_select(SelectConfig(s["retain"], (s["a"], s["b"]), row["p"], row["q"], row["mode"]))
            setting = Setting(row["mode"], row["targets"], row["p"], row["q"])
            from spinctl.evaluation.sweep import tensor_filter

            keep = tensor_filter(list(indices), setting.targets)
            indices = {n: (a if n in keep else a[:0]) for n, a in indices.items()}
            res = patch(PatchConfig(s["model"], out), SelectionFile(s["retain"], meta, indices))
            assert res["totals"]["zeroed"] == row["zeroed"]
        pref = run_preference(
            PreferenceConfig(
                out,
                (s["priv"], s["fair"]),
                (s["a"], s["b"]),
                batch_size=4,
                resamples=500,
                device="cpu",
                dtype="float32",
            )
        )
        for ps in pref["pair_sets"]:
            assert {k: ps[k] for k in row["pairs"][ps["name"]]} == row["pairs"][ps["name"]], row["setting"]
        ppl = perplexity(
            out,
            s["general"],
            device="cpu",
            dtype="float32",
            batch_size=4,
            rows=16,
            exclude=(s["retain"], s["a"], s["b"]),
        )
        assert ppl["ppl"] == row["ppl"], row["setting"]
        judged = evaluate(
            EvalConfig(out, s["questions"], limit=3, max_new_tokens=6, batch_size=4, device="cpu", dtype="float32")
        )
        assert judged["rate"] == row["judged"]["questions"], row["setting"]


def sweep_argv(s: dict) -> list:
    """`spinctl sweep MODEL --retain R --couple A --couple B` for the setup's files."""
    return ["sweep", s["model"], "--retain", s["retain"], "--couple", s["a"], "--couple", s["b"]]


def test_sweep_cli_equals_patch_and_eval_cli(setup, tmp_path):
    """The same check through the commands a user runs: sweep --json, patch, eval --pairs, ppl."""
    s = setup
    common = ["--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--resamples", "300"]
    r = cli(
        *sweep_argv(s),
        "--p",
        "0.01",
        "--q",
        "0.03,0.05",
        "--pairs",
        *s["priv"],
        "--pairs",
        *s["fair"],
        "--ppl-data",
        s["general"],
        "--ppl-rows",
        "16",
        "--max-ppl-increase",
        "50%",
        "--csv",
        tmp_path / "t.csv",
        *common,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    result = json.loads(r.stdout)
    row = result["rows"][2]
    assert (row["mode"], row["p"], row["q"], row["targets"]) == ("paper", 0.01, 0.05, "all")
    out = tmp_path / "patched"
    assert (
        cli(
            "patch",
            s["model"],
            out,
            "--retain",
            s["retain"],
            "--couple",
            s["a"],
            "--couple",
            s["b"],
            "--p",
            "0.01",
            "--q",
            "0.05",
        ).returncode
        == 0
    )
    ev = cli(
        "eval",
        out,
        "--pairs",
        *s["priv"],
        "--pairs",
        *s["fair"],
        "--exclude",
        s["a"],
        "--exclude",
        s["b"],
        *common,
        "--json",
    )
    assert ev.returncode == 0, ev.stderr
    for ps in json.loads(ev.stdout)["pair_sets"]:
        assert {k: ps[k] for k in row["pairs"][ps["name"]]} == row["pairs"][ps["name"]]
    pp = cli(
        "ppl",
        out,
        s["general"],
        "--rows",
        "16",
        "--exclude",
        s["retain"],
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        "4",
        "--json",
    )
    assert pp.returncode == 0, pp.stderr
    assert json.loads(pp.stdout)["ppl"] == row["ppl"]
    # CSV: a header and one line per row, with the per pair set columns.
    lines = list(csv.DictReader(open(tmp_path / "t.csv", encoding="utf-8")))
    assert len(lines) == 3 and lines[0]["setting"] == "original" and lines[0]["mode"] == ""
    assert float(lines[2]["ppl"]) == row["ppl"] and float(lines[2]["priv_accuracy"]) == row["pairs"]["priv"]["accuracy"]
    assert {"priv_ci_low", "fair_ci_high", "fair_margin", "awareness", "zeroed", "best"} <= set(lines[0])
    assert sum(line["best"] == "True" for line in lines) == (result["best"] is not None)


# ---------------------------------------------------------------- restore, best rule, outputs


def test_restore_is_exact(setup):
    import torch

    from spinctl.evaluation.evaluate import load_causal_lm
    from spinctl.evaluation.sweep import check_targets
    from spinctl.io.formats import read_scores

    s = setup
    model, tok = load_causal_lm(s["model"], "cpu", "float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    retain, a, b = (read_scores(s[k]) for k in ("retain", "a", "b"))
    sel = selection_for(retain, [a, b], Setting("paper", "attn", 0.01, 0.05))
    assert all(not len(v) for n, v in sel.items() if "mlp" in n) and sum(map(len, sel.values())) > 0
    params = check_targets(model, retain.shapes, s["model"])
    with zeroed(params, sel) as n:
        assert n == sum(map(len, sel.values()))
        for name, idx in sel.items():
            flat = params[name].detach().view(-1)
            assert (flat[torch.from_numpy(idx)] == 0).all() and not torch.signbit(flat[torch.from_numpy(idx)]).any()
            rest = np.setdiff1d(np.arange(flat.numel()), idx)
            assert torch.equal(flat[torch.from_numpy(rest)], before[name].view(-1)[torch.from_numpy(rest)])
    sweep_model(model, tok, config(s, p=(0.0, 0.01), q=(0.05,), modes=("paper", "reference")))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # bitwise: int views
        assert torch.equal(before[k].view(torch.int32), after[k].view(torch.int32)), k


def _rows(*specs):
    """(ppl, awareness, zeroed) per row; row 0 the baseline."""
    return [{"ppl": p, "awareness": a, "zeroed": z} for p, a, z in specs]


def test_best_setting_rule():
    rows = _rows((10.0, 0.5, 0), (10.1, 0.7, 50), (10.3, 0.9, 10), (10.2, 0.7, 20), (9.9, 0.6, 5))
    assert pick_best(rows, 0.02) == 3  # 0.9 is over budget (10.3 > 10.2); 0.7 twice -> fewer zeroed
    assert pick_best(rows, 0.03) == 2
    assert pick_best(rows, 0.0) == 4  # only the setting that lowered ppl fits
    assert pick_best(_rows((10.0, 0.5, 0), (11.0, 0.9, 1)), 0.02) is None
    assert pick_best(_rows((10.0, 0.5, 0), (10.0, 0.6, 3), (10.0, 0.6, 3)), 0.0) == 1  # full tie: grid order
    assert pick_best(_rows((10.0, 0.5, 0), (10.2, 0.6, 3)), 0.02) == 1  # the limit itself fits
    assert parse_budget("2%") == parse_budget("0.02") == pytest.approx(0.02) and parse_budget(" 0 ") == 0
    for bad in ("two", "-1%", "nan"):
        with pytest.raises(SpinctlError, match="max-ppl-increase"):
            parse_budget(bad)


def test_json_table_and_plot(setup, tmp_path):
    pytest.importorskip("matplotlib")
    s = setup
    png = tmp_path / "sweep.png"
    r = cli(
        *sweep_argv(s),
        "--p",
        "0.01",
        "--q",
        "0.05",
        "--targets",
        "mlp",
        "--pairs",
        *s["priv"],
        "--pairs",
        *s["fair"],
        "--ppl-data",
        s["general"],
        "--ppl-rows",
        "8",
        "--device",
        "cpu",
        "--plot",
        png,
        "--max-ppl-increase",
        "0.5",
    )
    assert r.returncode == 0, r.stderr
    assert "original" in r.stdout and "paper p=0.01 q=0.05 mlp" in r.stdout and "best within +50.00%" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = cli(
        "sweep",
        s["model"],
        "--retain",
        s["retain"],
        "--couple",
        s["a"],
        "--p",
        "0.01",
        "--q",
        "0.05",
        "--pairs",
        *s["priv"],
        "--ppl-data",
        s["general"],
        "--ppl-rows",
        "8",
        "--device",
        "cpu",
        "--max-ppl-increase",
        "0",
        "--json",
    )
    out = json.loads(r.stdout)
    assert set(out) >= {"rows", "best", "best_setting", "pair_sets", "ppl_limit", "seconds"}
    assert set(out["rows"][0]) == {
        "setting",
        "method",
        "mode",
        "p",
        "q",
        "targets",
        "zeroed",
        "ppl",
        "ppl_change",
        "pairs",
        "awareness",
        "judged",
        "seconds",
        "best",
    }
    assert out["rows"][0]["method"] == "snip" and out["rows"][0]["ppl_change"] == 0
    assert out["pair_sets"]["priv"]["excluded"] >= 1  # the couple file's calibration prompts are held out
    assert out["best_setting"] in ("none", out["rows"][1]["setting"])


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    from spinctl.evaluation.sweep_report import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SpinctlError, match=r"pip install 'spinctl\[plot\]'"):
        require_matplotlib()


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs(setup, tiny_model, tmp_path):
    s = setup
    with pytest.raises(SpinctlError, match="kept only the top 0.05 of each tensor, below --p 0.1"):
        run_sweep(config(s, p=(0.01, 0.1)))
    other = score_file(tiny_model("qwen2"), tmp_path / "q.safetensors", s["priv"][0], nsamples=2)
    with pytest.raises(SpinctlError, match="scored a different model"):
        run_sweep(config(s, couple=(s["a"], other)))
    with pytest.raises(SpinctlError, match="empty grid"):
        config(s, p=())
    with pytest.raises(SpinctlError, match="matches none of the"):
        run_sweep(config(s, targets=("re:nothing_like_this",)))
    with pytest.raises(SpinctlError, match="exactly two --couple"):
        config(s, couple=(s["a"],), modes=("reference",))
    with pytest.raises(SpinctlError, match="--pairs"):
        config(s, pairs=())
    with pytest.raises(SpinctlError, match="only 32 held-out rows"):  # 40 rows, 8 picked by the retain file
        run_sweep(config(s, ppl_rows=33))
    base = [
        "sweep",
        s["model"],
        "--retain",
        s["retain"],
        "--couple",
        s["a"],
        "--pairs",
        *s["priv"],
        "--ppl-data",
        s["general"],
        "--ppl-rows",
        "8",
        "--device",
        "cpu",
    ]
    r = cli(*base, "--q", "0.05")  # no --p: usage error
    assert r.returncode == 2
    r = cli(*base, "--p", "0.5", "--q", "0.05")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "rescore with --keep" in r.stderr
    r = cli(*base, "--p", "0.01", "--q", "0.05", "--max-ppl-increase", "lots")
    assert r.returncode == 2 and "max-ppl-increase" in r.stderr  # out of range: a usage error, as elsewhere
