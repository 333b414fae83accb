"""The report's summary as rich tables in the terminal: the same figures as the Markdown."""

from __future__ import annotations

from spinctl.report.markdown import change_text, number_text


def print_report(r: dict, console) -> None:
    from rich.table import Table

    s = r["summary"]
    sel = s["selection"]
    t = Table(title=f"SPIN patch: {s['zeroed']:,} weights zeroed", show_header=False)
    for k, v in (
        ("mode / p / q", f"{sel['mode']} / {sel['p']:g} / {sel['q']:g}"),
        ("tensors touched", f"{s['tensors_touched']} of {s['tensors']} scored ({s['scored']:,} weights)"),
        ("selection sha256", f"{sel['sha256']} ({sel['file']})"),
        ("manifest sha256", f"{s['manifest']['sha256']} ({s['manifest']['file']} as the patch wrote it)"),
        ("spinctl", s["version"]),
    ):
        t.add_row(k, v)
    console.print(t)
    t = Table(title="calibration data")
    for col in ("set", "role", "data sha256", "rows", "samples", "method", "in top set / stored", "cut-off (median)"):
        t.add_column(col, justify="right" if col in ("rows", "samples", "in top set / stored") else "left")
    for x in s["sets"]:
        cut = "–" if x["cutoff_median"] is None else f"{x['cutoff_median']:.3g}"
        frac = f"{x['role']} ({'p' if x['role'] == 'retain' else 'q'} {x['fraction']:g})"
        t.add_row(
            x["label"],
            frac,
            x["dataset_sha256"][:16] + "…",
            str(x["dataset_rows"]),
            str(x["samples"]),
            x["method"],
            f"{x['in_top']:,} / {x['stored']:,}",
            cut,
        )
    console.print(t)
    g = s["grid"]
    t = Table(title="zeroed weights per layer and module")
    for col in ("layer", *g["kinds"], "all"):
        t.add_column(col, justify="right")
    for lay, row in zip(g["layers"], g["zeroed"]):
        t.add_row(str(lay), *[f"{c:,}" for c in row], f"{sum(row):,}")
    console.print(t)
    if s["evals"]:
        t = Table(title="before / after")
        for col in ("metric", "set", "before", "after", "change"):
            t.add_column(col, justify="left" if col in ("metric", "set") else "right")
        for e in s["evals"]:
            t.add_row(e["metric"], e["set"] or "–", number_text(e["before"]), number_text(e["after"]), change_text(e))
        console.print(t)
    else:
        console.print("no eval results given: no before/after figures")
    if r["plots_skipped"]:
        console.print(r["plots_skipped"])
    console.print(f"report -> {r['output']}: " + ", ".join(f.rsplit("/", 1)[-1] for f in r["files"]))
    if r["card"]:
        console.print(f"model-card section written into {r['card']} (recorded in the manifest)")
