"""The report's summary as rich tables in the terminal: the same figures as the Markdown."""

from __future__ import annotations

from spinctl.report.markdown import change_text, number_text


def _table(title: str, columns: tuple = (), right: tuple = (), **kw):
    """A rich table whose headers and cells are shown as they are, never read as rich markup: a pair set or a
    file named `[/x]` would otherwise stop the printing half-way, after the report was written."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, **kw)
    for col in columns:
        t.add_column(escape(str(col)), justify="right" if col in right else "left")
    return t


def _row(t, *cells) -> None:
    from rich.markup import escape

    t.add_row(*(escape(str(c)) for c in cells))


def print_report(r: dict, console) -> None:

    s = r["summary"]
    sel = s["selection"]
    t = _table(f"SPIN patch: {s['zeroed']:,} weights zeroed", show_header=False)
    for k, v in (
        ("mode / p / q", f"{sel['mode']} / {sel['p']:g} / {sel['q']:g}"),
        ("tensors touched", f"{s['tensors_touched']} of {s['tensors']} scored ({s['scored']:,} weights)"),
        ("selection sha256", f"{sel['sha256']} ({sel['file']})"),
        ("manifest sha256", f"{s['manifest']['sha256']} ({s['manifest']['file']} as the patch wrote it)"),
        ("spinctl", s["version"]),
    ):
        _row(t, k, v)
    console.print(t)
    cols = ("set", "role", "data sha256", "rows", "samples", "method", "in top set / stored", "cut-off (median)")
    t = _table("calibration data", cols, right=("rows", "samples", "in top set / stored"))
    for x in s["sets"]:
        cut = "–" if x["cutoff_median"] is None else f"{x['cutoff_median']:.3g}"
        frac = f"{x['role']} ({'p' if x['role'] == 'retain' else 'q'} {x['fraction']:g})"
        _row(
            t,
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
    cols = ("layer", *g["kinds"], "all")
    t = _table("zeroed weights per layer and module", cols, right=cols)
    for lay, row in zip(g["layers"], g["zeroed"]):
        _row(t, lay, *[f"{c:,}" for c in row], f"{sum(row):,}")
    console.print(t)
    if s["evals"]:
        t = _table(
            "before / after", ("metric", "set", "before", "after", "change"), right=("before", "after", "change")
        )
        for e in s["evals"]:
            _row(t, e["metric"], e["set"] or "–", number_text(e["before"]), number_text(e["after"]), change_text(e))
        console.print(t)
    else:
        console.print("no eval results given: no before/after figures")
    if r["plots_skipped"]:
        console.print(r["plots_skipped"], markup=False)
    console.print(f"report -> {r['output']}: " + ", ".join(f.rsplit("/", 1)[-1] for f in r["files"]), markup=False)
    if r["card"]:
        console.print(f"model-card section written into {r['card']} (recorded in the manifest)", markup=False)
