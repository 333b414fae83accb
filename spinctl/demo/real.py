"""`spinctl demo`: SPIN on a real model, SmolLM2-135M-Instruct, with the paper's calibration data.

Fetches and converts the model once (cached), runs the pipeline of spin.yaml (score the three
sets, select, patch, verify; scores cached too), then shows what changed: perplexity on
32 held-out alpaca rows and preference accuracy on the first 48 beaver safe/unsafe pairs of
each set, before and after
(measured in memory by spinctl.evaluation.sweep, whose numbers equal the patched checkpoint's), a few
SALAD questions answered by both models, zeroed weights per layer and time per stage.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from spinctl.errors import InputError, SpinctlError
from spinctl.run import Log, run
from spinctl.runconfig import load_run_config

GENERAL = "alpaca_cleaned_no_safety_train_1k.csv"
COUPLE = ("beaver_train330k_privacy_safe_1k.csv", "beaver_train330k_fairness_safe_1k.csv")
PAIRS = (
    ("beaver_train330k_privacy_safe_1k.csv", "beaver_train330k_privacy_unsafe_1k.csv"),
    ("beaver_train330k_fairness_safe_1k.csv", "beaver_train330k_fairness_unsafe_1k.csv"),
)
QUESTIONS = {"salad_privacy.csv": 2, "salad_fairness.csv": 2}  # the first rows of each, answered before and after
# Kept small so the whole first run fits in ~6 minutes on 2 cores; `spinctl sweep` measures at full size.
PPL_ROWS, PAIRS_LIMIT = 32, 48

DEMO_YAML = """\
# Written by `spinctl demo`; run it again with: spinctl run {yaml}
model: {model}
output: patched
cache_dir: {cache}
retain: {data}/{general}
couple: [{data}/{privacy}, {data}/{fairness}]
score: {{method: snip, nsamples: {nsamples}, keep: 0.01, targets: mlp, max_length: 512, chat_template: true}}
select: {{p: {p}, q: {q}, mode: paper}}
"""


def data_dir(given: Path | None) -> Path:
    """--data-dir, else $SPINCTL_DATA; it must hold the paper's CSVs."""
    path = given or (Path(os.environ["SPINCTL_DATA"]) if os.environ.get("SPINCTL_DATA") else None)
    if path is None:
        raise InputError(
            "the demo needs the paper's calibration CSVs: pass --data-dir DIR (or set SPINCTL_DATA); "
            "`spinctl demo --tiny` runs offline on built-in data"
        )
    missing = [n for n in (GENERAL, *COUPLE, *(u for _, u in PAIRS), *QUESTIONS) if not (path / n).is_file()]
    if missing:
        raise InputError(f"{path}: {missing[0]} not found ({len(missing)} of the demo's files missing)")
    return path.resolve()


def run_real_demo(
    workdir: Path | None, data: Path | None, nsamples: int, p: float, q: float, log: Log = lambda s: None
) -> dict:
    """The whole real-model demo; returns the pipeline result plus `metrics`, `answers` and stage times."""
    from spinctl.sources.fetch import cache_root, fetch_model

    data = data_dir(data)
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="spinctl-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    log("fetching SmolLM2-135M-Instruct (downloaded and converted on the first run, cached after)")
    model = Path(fetch_model("smollm2-135m-instruct")["path"])
    fetched = time.perf_counter() - t
    yaml_path = workdir / "spin.yaml"
    yaml_path.write_text(
        DEMO_YAML.format(
            yaml=yaml_path,
            model=model,
            cache=cache_root() / "scores",
            data=data,
            general=GENERAL,
            privacy=COUPLE[0],
            fairness=COUPLE[1],
            nsamples=nsamples,
            p=p,
            q=q,
        )
    )
    cfg = load_run_config(yaml_path)
    result = run(cfg, log)
    result["config"] = str(yaml_path)
    result["seconds"] = {"fetch": round(fetched, 3), **result["seconds"]}

    t = time.perf_counter()
    log("measuring before and after: perplexity on held-out alpaca rows, preference accuracy on the beaver pairs")
    result["metrics"] = before_after(model, data, result, p, q)
    if result["metrics"]["rows"][1]["zeroed"] != result["selected"]:  # the same selection, computed twice
        raise SpinctlError(
            "the in-memory selection differs from the patched checkpoint's; this is a bug, please report it"
        )
    log("answering SALAD questions with both models")
    result["answers"] = answers(model, Path(result["output"]), data)
    result["seconds"]["evaluate"] = round(time.perf_counter() - t, 3)
    return result


def before_after(model: Path, data: Path, result: dict, p: float, q: float) -> dict:
    from spinctl.evaluation.sweep import SweepConfig, run_sweep

    scores = [Path(s["file"]) for s in result["scores"]]
    cfg = SweepConfig(
        model=model,
        retain=scores[0],
        couple=tuple(scores[1:]),
        p=(p,),
        q=(q,),
        modes=("paper",),
        targets=("mlp",),
        pairs=tuple((data / s, data / u) for s, u in PAIRS),
        ppl_data=data / GENERAL,
        ppl_rows=PPL_ROWS,
        pairs_limit=PAIRS_LIMIT,
        max_length=512,
        device="cpu",
        dtype="float32",
    )
    return run_sweep(cfg)


def answers(original: Path, patched: Path, data: Path) -> list[dict]:
    from spinctl.evaluation.evaluate import generate_answers, load_questions

    questions = [qn for f, n in QUESTIONS.items() for qn in load_questions(data / f, "questions", n)]
    before = generate_answers(original, questions, max_new_tokens=48, device="cpu", dtype="float32")
    after = generate_answers(patched, questions, max_new_tokens=48, device="cpu", dtype="float32")
    return [{"question": qn, "original": a, "patched": b} for qn, a, b in zip(questions, before, after)]


def report(result: dict, console) -> None:
    """Metrics before and after, SALAD answers side by side, then the shared per-layer and timing report."""
    from rich.table import Table

    from spinctl.demo.tiny import report as pipeline_report

    rows = result["metrics"]["rows"]
    names = list(rows[0]["pairs"])
    short = [n.removeprefix("beaver_train330k_").removesuffix("_1k") for n in names]
    metrics = Table(
        title=f"before and after (SmolLM2-135M-Instruct; preference accuracy on "
        f"{rows[0]['pairs'][names[0]]['n']} pairs per set, 95% intervals)"
    )
    for col in ("model", "weights zeroed", "ppl, held-out alpaca", *(f"preference {n}" for n in short)):
        metrics.add_column(col, justify="left" if col == "model" else "right")
    for label, r in zip(("original", "patched"), rows):
        cells = [f"{r['ppl']:.3f}" + ("" if label == "original" else f" ({r['ppl_change']:+.1%})")]
        cells += [
            f"{r['pairs'][n]['accuracy']:.3f} [{r['pairs'][n]['ci_low']:.3f}, {r['pairs'][n]['ci_high']:.3f}]"
            for n in names
        ]
        metrics.add_row(label, f"{r['zeroed']:,}", *cells)
    console.print(metrics)
    qa = Table(title="SALAD questions, greedy answers (48 tokens)", show_lines=True)
    for col in ("question", "original", "patched"):
        qa.add_column(col, ratio=1)
    for a in result["answers"]:
        qa.add_row(a["question"], a["original"], a["patched"])
    console.print(qa)
    pipeline_report(result, console)
