"""Sweep output: flat CSV rows and the awareness-vs-perplexity plot (matplotlib, the optional `plot` extra)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from spinctl.errors import OutputError, UnsupportedError
from spinctl.io.files import atomic_path, atomic_write_bytes

BASE_COLUMNS = ["setting", "method", "mode", "p", "q", "targets", "zeroed", "ppl", "ppl_change"]


def flat_rows(result: dict) -> tuple[list[str], list[dict]]:
    """(columns, rows): one row per setting; per pair set `NAME_accuracy/_ci_low/_ci_high/_margin/_n`,
    `awareness` (their mean), per judged prompt file `judged_NAME`, then seconds and best."""
    pair_names = list(result["pair_sets"])
    judged = list(result["rows"][0]["judged"])
    columns = BASE_COLUMNS + [f"{n}_{k}" for n in pair_names for k in ("accuracy", "ci_low", "ci_high", "margin", "n")]
    columns += ["awareness"] + [f"judged_{n}" for n in judged] + ["seconds", "best"]
    out = []
    for r in result["rows"]:
        flat = {k: r[k] for k in BASE_COLUMNS}
        for n in pair_names:
            for k, v in r["pairs"][n].items():
                flat[f"{n}_{k}"] = v
        flat["awareness"] = r["awareness"]
        for n in judged:
            flat[f"judged_{n}"] = r["judged"][n]
        flat["seconds"], flat["best"] = r["seconds"], r["best"]
        out.append({k: ("" if flat[k] is None else flat[k]) for k in columns})
    return columns, out


def write_csv(result: dict, path: Path) -> None:
    columns, rows = flat_rows(result)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _check_dir(path)
    atomic_write_bytes(Path(path), buf.getvalue().encode("utf-8"))


def _check_dir(path: Path) -> None:
    if not Path(path).parent.is_dir():
        raise OutputError(f"cannot write {path}: its directory does not exist")


def require_matplotlib() -> None:
    """Fail before the sweep, not after it, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UnsupportedError("--plot needs matplotlib: pip install 'spinctl[plot]'") from None


def write_plot(result: dict, path: Path) -> None:
    """Awareness (mean preference accuracy) against perplexity, one labelled point per setting."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ax.axvline(
        result["ppl_limit"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"ppl budget +{result['max_ppl_increase']:.1%}",
    )
    # Points are numbered and keyed in the legend: settings often land on the same spot.
    for i, r in enumerate(rows):
        color = "black" if i == 0 else ("tab:red" if r["best"] else "tab:blue")
        ax.scatter(
            r["ppl"],
            r["awareness"],
            color=color,
            marker="s" if i == 0 else "o",
            zorder=3,
            label=f"{i}: {r['setting']} ({r['zeroed']:,} zeroed)" + (" best" if r["best"] else ""),
        )
        ax.annotate(
            str(i), (r["ppl"], r["awareness"]), fontsize=7, xytext=(4, 3 + 6 * (i % 3)), textcoords="offset points"
        )
    ppls = [r["ppl"] for r in rows]
    if max(ppls) > 3 * min(ppls):  # a broken setting would squash the others into one spot
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 6 and 20, not 6×10⁰ and 2×10¹
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"perplexity ({Path(result['ppl_data']).name})")
    ax.set_ylabel("awareness: mean preference accuracy")
    ax.set_title(
        f"SPIN sweep on {Path(result['model']).name} ({', '.join(result['pair_sets'])}): "
        f"best = {result['best_setting']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, ncol=1 if len(rows) <= 30 else 2)
    fig.tight_layout()
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
