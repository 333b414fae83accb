"""The report's Markdown: a model-card section (tables, hashes, the recipe) from the summary; deterministic."""

from __future__ import annotations

from pathlib import Path

MODES = {
    "paper": "in the top-q set of every coupled set and not in the top-p set of the retain set",
    "reference": "kept by the official code's positional test against the retain top-p set (mode reference)",
}


def _pct(x: float) -> str:
    return f"{x:.4%}" if x < 0.01 else f"{x:.2%}"


def _table(header: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _cell(c) -> str:
    """A table cell: a `|` or a line break in a name (a pair set's, a file's) would break the table."""
    return " ".join(str(c).splitlines()).replace("|", "\\|")


def number_text(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def change_text(r: dict) -> str:
    if r["before"] is None or r["after"] is None:
        return "–"
    if r["metric"] == "perplexity":
        return f"{r['after'] / r['before'] - 1:+.2%}"
    return f"{r['after'] - r['before']:+.4f}"


def _n(r: dict) -> str:
    return " / ".join(str(r[k]) for k in ("before_n", "after_n") if k in r)


def summary_markdown(s: dict) -> str:
    """The section pasted into a model card (or written into README.md by --card)."""
    sel, sets = s["selection"], s["sets"]
    retain = [x["label"] for x in sets if x["role"] == "retain"][0]
    coupled = ", ".join(x["label"] for x in sets if x["role"] == "coupled")
    lines = [
        "## SPIN weight surgery",
        "",
        f"This checkpoint was edited with spinctl {s['version']}, which implements SPIN (arXiv 2410.16672): "
        f"**{s['zeroed']:,}** weights were set to zero ({_pct(s['zeroed'] / max(s['scored'], 1))} of the "
        f"{s['scored']:,} weights scored), those {MODES.get(sel['mode'], 'selected')}; "
        f"coupled sets: {coupled}; retain set: {retain}.",
        "",
    ]
    lines += _table(
        ["", "value"],
        [
            ["mode", sel["mode"]],
            ["p (retain fraction)", f"{sel['p']:g}"],
            ["q (coupled fraction)", f"{sel['q']:g}"],
            ["weights zeroed", f"{s['zeroed']:,}"],
            ["tensors touched", f"{s['tensors_touched']} of {s['tensors']} scored"],
            ["model fingerprint", f"`{s['fingerprint']}`"],
            ["selection sha256", f"`{sel['sha256']}` ({sel['file']})"],
            ["manifest sha256", f"`{s['manifest']['sha256']}` ({s['manifest']['file']} as the patch wrote it)"],
            ["undo log sha256", f"`{s['manifest']['undo_sha256']}`" if s["manifest"]["undo_sha256"] else "–"],
        ],
    )
    lines += ["### Calibration data", ""]
    lines += _table(
        ["set", "role", "data sha256", "rows", "samples", "method", "top-set cut-off (median)", "score file sha256"],
        [
            [
                x["label"],
                f"{x['role']} ({'p' if x['role'] == 'retain' else 'q'} {x['fraction']:g})",
                f"`{x['dataset_sha256']}`",
                x["dataset_rows"],
                x["samples"],
                x["method"],
                "–" if x["cutoff_median"] is None else f"{x['cutoff_median']:.3g}",
                f"`{x['score_sha256']}`",
            ]
            for x in sets
        ],
        right={3, 4, 6},
    )
    lines += _grid(s["grid"])
    lines += ["### Evaluation", ""]
    if s["evals"]:
        lines += _table(
            ["metric", "set", "before", "after", "change", "n"],
            [
                [r["metric"], r["set"] or "–", number_text(r["before"]), number_text(r["after"]), change_text(r), _n(r)]
                for r in s["evals"]
            ],
            right={2, 3, 4},
        )
    else:
        lines += ["No eval results were given: no before/after figures.", ""]
    lines += ["### Patched weight files", ""]
    lines += _table(
        ["file", "zeroed", "sha256"],
        [
            [w["file"], f"{w['zeroed']:,}", f"`{w['sha256']}`" if w["sha256"] else "not hashed (--no-hash)"]
            for w in s["weight_files"]
        ],
        right={1},
    )
    recipe = s["recipe"]
    if recipe["kind"] == "spin.yaml":
        lines += [
            "### How it was made",
            "",
            "`spinctl run` with this spin.yaml"
            + (":" if not recipe.get("overrides") else f" and {' '.join('--set ' + o for o in recipe['overrides'])}:"),
            "",
        ]
        lines += ["```yaml", recipe["text"].rstrip("\n"), "```", ""]
    else:
        lines += [
            "### How it was made",
            "",
            "MODEL and the data files are the ones whose fingerprint and sha256 are above.",
            "",
        ]
        lines += ["```sh", *recipe["lines"], "```", ""]
    return "\n".join(lines)


def _grid(g: dict) -> list[str]:
    out = ["### Zeroed weights per layer and module", ""]
    rows = [[lay, *[f"{c:,}" for c in row], f"{sum(row):,}"] for lay, row in zip(g["layers"], g["zeroed"])]
    totals = [sum(col) for col in zip(*g["zeroed"])] if g["zeroed"] else []
    rows.append(["**all**", *[f"{c:,}" for c in totals], f"{sum(totals):,}"])
    return out + _table(["layer", *g["kinds"], "all"], rows, right=set(range(1, len(g["kinds"]) + 2)))


def report_markdown(s: dict, pngs: list[str], skipped: str | None) -> str:
    """report.md: the summary, then the plots (or the line saying why there are none)."""
    text = "# spinctl report\n\n" + summary_markdown(s) + "\n### Plots\n\n"
    if skipped:
        return text + skipped + "\n"
    captions = {
        "zeroed_heatmap.png": "zeroed weights per layer and module",
        "score_distributions.png": "score distributions and top-set cut-offs",
        "eval_bars.png": "before/after",
    }
    return text + "".join(f"![{captions.get(p, Path(p).stem)}]({p})\n\n" for p in pngs)
