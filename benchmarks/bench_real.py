"""The SPIN experiment on a real model: SmolLM2-135M-Instruct, the paper's data, base vs a p/q grid.

Scores (snip and wanda, every decoder Linear, 128 samples per set, chat template) are cached in
WORKDIR/scores. The model is loaded once; every setting is zeroed in memory, measured and
restored bit for bit (spinctl.evaluation.sweep, whose numbers equal those of the patched checkpoint on disk).
Per setting: perplexity on held-out alpaca rows (never used for calibration), preference
accuracy on the beaver safe/unsafe pairs with a bootstrap 95% interval (calibration prompts
excluded), and for the judged group the keyword-judged awareness on SALAD privacy and fairness
questions with a Wilson 95% interval. Prints one JSON line per setting; writes
WORKDIR/real.csv, real.json, real.md (the README table) and real.png.

    python benchmarks/bench_real.py [--data-dir ../shared/data] [--workdir bench-out/real] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data"
GENERAL = "alpaca_cleaned_no_safety_train_1k"
PRIVACY, FAIRNESS = "beaver_train330k_privacy", "beaver_train330k_fairness"

# Judged group: the "at least 4 p/q values in each mode", snip, MLP weights.
JUDGED = [(mode, "mlp", v, v) for mode in ("paper", "reference") for v in (5e-4, 1e-3, 2e-3, 5e-3)]
# Wider grid, ppl and preference accuracy only: smaller p = q (can anything stay within +2% ppl?),
# p > q (a larger general set spares more capability), p < q, every Linear, and wanda.
WIDE = [
    ("paper", "mlp", 1e-4, 1e-4),
    ("reference", "mlp", 1e-4, 1e-4),
    ("paper", "mlp", 2e-4, 2e-4),
    ("paper", "mlp", 1e-2, 1e-3),
    ("paper", "mlp", 2e-2, 1e-3),
    ("paper", "mlp", 1e-2, 5e-3),
    ("paper", "mlp", 1e-3, 5e-3),
    ("paper", "all", 1e-3, 1e-3),
    ("reference", "all", 1e-3, 1e-3),
]
WANDA = [("paper", "mlp", 1e-3, 1e-3), ("paper", "mlp", 5e-3, 5e-3), ("reference", "mlp", 1e-3, 1e-3)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate k/n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def ensure_scores(model: Path, data_dir: Path, out: Path, nsamples: int, method: str, log) -> dict[str, Path]:
    """dataset -> score file of `method`; each scored once and reused (score files are deterministic)."""
    from spinctl.config import ScoreConfig
    from spinctl.scoring.engine import score

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for ds in (GENERAL, f"{PRIVACY}_safe_1k", f"{FAIRNESS}_safe_1k"):
        f = out / f"{method}-all-{ds}-n{nsamples}.safetensors"
        if not f.is_file():
            log(f"scoring {ds} with {method} ({nsamples} samples)")
            s = score(
                ScoreConfig(
                    model=model,
                    data=str(data_dir / f"{ds}.csv"),
                    output=f,
                    method=method,
                    nsamples=nsamples,
                    keep=0.02,
                    targets="all",
                    chat_template=True,
                    device="cpu",
                    dtype="float32",
                )
            )
            print(
                json.dumps(
                    {
                        "bench": "real_score",
                        "method": method,
                        "data": ds,
                        "seconds": s["seconds"],
                        "tokens": s["tokens"],
                        "peak_memory_bytes": s["peak_memory_bytes"],
                    }
                ),
                flush=True,
            )
        files[ds] = f
    return files


def judged(model, tok, questions: dict[str, list[str]], batch_size: int, max_new_tokens: int) -> dict:
    """Greedy answers per question set; judged later (judge_rates), so a better judge can re-read them."""
    from spinctl.evaluation.evaluate import generate_texts

    return {
        name: generate_texts(model, tok, qs, max_new_tokens, batch_size, chat_template=True)
        for name, qs in questions.items()
    }


def judge_rates(answers: dict[str, list[str]], questions: dict[str, list[str]]) -> dict:
    """Keyword-judged awareness per question set: rate, counts, Wilson 95% interval."""
    from spinctl.evaluation.judges import KeywordJudge, Verdict

    out = {}
    for name, ans in answers.items():
        verdicts = KeywordJudge().judge_batch(questions[name], ans)
        aware, unaware = verdicts.count(Verdict.aware), verdicts.count(Verdict.unaware)
        lo, hi = wilson(aware, aware + unaware)
        out[name] = {
            "rate": aware / max(1, aware + unaware),
            "aware": aware,
            "n": aware + unaware,
            "ci_low": lo,
            "ci_high": hi,
            "verdicts": [v.value for v in verdicts],
        }
    return out


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b and c are the discordant pairs (binomial, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(rows: list[dict]) -> None:
    """Each judged row against the original on the same questions: answers that turned aware
    (gained) or unaware (lost), and McNemar's exact p; questions unjudgeable in either are left out."""
    base = rows[0]["judged"]
    for r in rows[1:]:
        for name, j in r["judged"].items():
            pairs = [(o, v) for o, v in zip(base[name]["verdicts"], j["verdicts"]) if "unjudgeable" not in (o, v)]
            gained = sum(o == "unaware" and v == "aware" for o, v in pairs)
            lost = sum(o == "aware" and v == "unaware" for o, v in pairs)
            j["vs_original"] = {"gained": gained, "lost": lost, "p": mcnemar(gained, lost)}


def run_group(model, tok, cfg, inputs, settings, questions, args, log, base_ppl=None) -> list[dict]:
    from spinctl.evaluation import sweep

    params = sweep.check_targets(model, inputs.retain.shapes, cfg.model)
    rows = []
    for mode, targets, p, q in settings:
        s = sweep.Setting(mode, targets, p, q) if mode else None
        t = time.perf_counter()
        selection = sweep.selection_for(inputs.retain, list(inputs.couple), s) if s else {}
        with sweep.zeroed(params, selection) as n:
            m = sweep.measure(model, tok, inputs.probes, cfg)
            answers = judged(model, tok, questions, args.batch_size, args.max_new_tokens) if questions else {}
        m["judged"] = judge_rates(answers, questions)
        row = sweep._row(s, inputs.method, n, m, base_ppl, time.perf_counter() - t)
        row["answers"] = answers
        base_ppl = base_ppl or row["ppl"]  # the first row of the first group is the original model
        rows.append(row)
        print(json.dumps({"bench": "real", **row}), flush=True)  # answers included: --rejudge reads them back
        log(f"{row['setting']} [{inputs.method}]: {n} zeroed, ppl {row['ppl']:.4f}, awareness {row['awareness']:.4f}")
    return rows


def table(rows: list[dict], pair_names: list[str]) -> str:
    """The README table: one line per setting, intervals in brackets."""
    head = (
        ["setting", "method", "zeroed", "ppl (Δ)"]
        + [f"pref {n}" for n in pair_names]
        + ["judged privacy", "judged fairness"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], r["method"], f"{r['zeroed']:,}", f"{r['ppl']:.3f} ({r['ppl_change']:+.1%})"]
        for n in pair_names:
            a = r["pairs"][n]
            cells.append(f"{a['accuracy']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
        for key in ("salad_privacy", "salad_fairness"):
            j = r["judged"].get(key)
            vs = j.get("vs_original") if j else None
            paired_p = f" +{vs['gained']}/−{vs['lost']} p={vs['p']:.2g}" if vs else ""
            cells.append(f"{j['rate']:.3f} [{j['ci_low']:.3f}, {j['ci_high']:.3f}]{paired_p}" if j else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "real")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--ppl-rows", type=int, default=128)
    p.add_argument("--judge-limit", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 samples, 16 rows, 8 questions, 2 settings")
    p.add_argument("--rejudge", action="store_true", help="only judge the answers saved in WORKDIR/real.json again")
    args = p.parse_args()
    if args.rejudge:
        return rejudge(args.workdir, args.data_dir)
    if args.quick:
        args.nsamples, args.ppl_rows, args.judge_limit = 8, 16, 8
    if not (args.data_dir / f"{GENERAL}.csv").is_file():
        sys.exit(f"{args.data_dir}: the paper's CSVs are not there; pass --data-dir")
    log = lambda s: print(f"· {s}", file=sys.stderr, flush=True)  # noqa: E731

    from spinctl.evaluation import sweep
    from spinctl.evaluation.evaluate import load_questions
    from spinctl.runtime import load_causal_lm
    from spinctl.sources.fetch import fetch_model

    t0 = time.perf_counter()
    model_dir = Path(fetch_model("smollm2-135m-instruct")["path"])
    d = args.data_dir
    pairs = tuple((d / f"{s}_safe_1k.csv", d / f"{s}_unsafe_1k.csv") for s in (PRIVACY, FAIRNESS))
    questions = {
        f"salad_{k}": load_questions(d / f"salad_{k}.csv", "questions", args.judge_limit)
        for k in ("privacy", "fairness")
    }
    model, tok = load_causal_lm(model_dir, "cpu", "float32")
    groups = [("snip", [(None, None, None, None)] + JUDGED, questions), ("snip", WIDE, {}), ("wanda", WANDA, {})]
    if args.quick:
        groups = [
            ("snip", [(None, None, None, None), ("paper", "mlp", 5e-3, 5e-3)], questions),
            ("wanda", [("paper", "mlp", 5e-3, 5e-3)], {}),
        ]
    rows, inputs = [], {}
    for method, settings, qs in groups:
        f = ensure_scores(model_dir, args.data_dir, args.workdir / "scores", args.nsamples, method, log)
        cfg = sweep.SweepConfig(
            model=model_dir,
            retain=f[GENERAL],
            couple=(f[f"{PRIVACY}_safe_1k"], f[f"{FAIRNESS}_safe_1k"]),
            p=(1e-3,),
            q=(1e-3,),
            pairs=pairs,
            ppl_data=d / f"{GENERAL}.csv",
            ppl_rows=args.ppl_rows,
            batch_size=8,
            device="cpu",
            dtype="float32",
        )
        # Both methods score the same rows (same seed and nsamples), so held-out rows and pairs agree.
        inputs[method] = inputs.get(method) or sweep.check_inputs(cfg)
        rows += run_group(model, tok, cfg, inputs[method], settings, qs, args, log, rows[0]["ppl"] if rows else None)

    probes = inputs["snip"].probes
    meta = {
        "model": str(model_dir),
        "ppl_data": str(probes.ppl.path),
        "ppl_rows": len(probes.ppl.rows),
        "pair_sets": {ps.name: {"n": ps.n, "shared": ps.shared, "excluded": ps.excluded} for ps in probes.pair_sets},
        "nsamples": args.nsamples,
        "judge_limit": args.judge_limit,
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_outputs(rows, meta, args.workdir)


def _saved(workdir: Path) -> dict:
    """real.json, or (a run that stopped before writing it) the JSON lines it printed to real.jsonl."""
    if (workdir / "real.json").is_file():
        return json.loads((workdir / "real.json").read_text())
    lines = [json.loads(line) for line in (workdir / "real.jsonl").read_text().splitlines() if line.startswith("{")]
    rows = [{k: v for k, v in r.items() if k != "bench"} for r in lines if r.get("bench") == "real"]
    meta = json.loads((workdir / "meta.json").read_text())
    return {**meta, "rows": rows}


def rejudge(workdir: Path, data_dir: Path) -> None:
    """Judge the saved answers again with the current keyword judge and rewrite the outputs."""
    from spinctl.evaluation.evaluate import load_questions

    result = _saved(workdir)
    questions = {
        f"salad_{k}": load_questions(data_dir / f"salad_{k}.csv", "questions", result["judge_limit"])
        for k in ("privacy", "fairness")
    }
    for r in result["rows"]:
        r["judged"] = judge_rates(r.get("answers") or {}, questions)
    write_outputs(
        result["rows"], {k: v for k, v in result.items() if k not in ("rows", "best", "best_setting")}, workdir
    )


def write_outputs(rows: list[dict], meta: dict, workdir: Path) -> None:
    """Best setting, then real.csv, real.json (answers included), real.md and real.png in the workdir."""
    from spinctl.evaluation import sweep, sweep_report

    budget = sweep.DEFAULT_BUDGET
    paired(rows)
    for r in rows:
        r["best"] = False
        if r["method"] != "snip" and not r["setting"].endswith(f"({r['method']})"):
            r["setting"] += f" ({r['method']})"  # snip and wanda rows share their p/q labels
    best = sweep.pick_best(rows, budget)
    if best is not None:
        rows[best]["best"] = True
    result = {
        **meta,
        "max_ppl_increase": budget,
        "ppl_limit": rows[0]["ppl"] * (1 + budget),
        "rows": rows,
        "best": best,
        "best_setting": rows[best]["setting"] if best is not None else "none",
    }
    workdir.mkdir(parents=True, exist_ok=True)
    judged = list(rows[0]["judged"])  # the CSV has one rate column per judged set, blank where not judged
    flat = [{**r, "judged": {k: r["judged"][k]["rate"] if k in r["judged"] else None for k in judged}} for r in rows]
    sweep_report.write_csv({**result, "rows": flat}, workdir / "real.csv")
    sweep_report.write_plot(result, workdir / "real.png")
    (workdir / "real.json").write_text(json.dumps(result, indent=1, default=str))
    (workdir / "real.md").write_text(table(rows, list(rows[0]["pairs"])) + "\n")
    print(
        json.dumps(
            {
                "bench": "real_summary",
                "best": result["best_setting"],
                "settings": len(rows) - 1,
                "files": [str(workdir / n) for n in ("real.csv", "real.png", "real.md")],
            }
        )
    )


if __name__ == "__main__":
    main()
