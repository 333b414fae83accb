"""The report's PNGs (matplotlib, the optional `plot` extra): zeroed-weight heatmap, score distributions, eval bars.

Each is rendered to bytes, so nothing is written before every input has been read and drawn.
"""

from __future__ import annotations

import io

import numpy as np

from spinctl.report.inputs import Report

SKIPPED = "PNGs skipped: matplotlib is not installed (pip install 'spinctl[plot]')."


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def render(report: Report, bins: int) -> dict[str, bytes]:
    """{file name: PNG bytes}; eval bars only where there are eval results."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out = {"zeroed_heatmap.png": _heatmap(report.summary["grid"])}
    out["score_distributions.png"] = _distributions(report, bins)
    if report.summary["evals"]:
        out["eval_bars.png"] = _bars(report.summary["evals"])
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no version string: same bytes
    finally:
        plt.close(fig)
    return buf.getvalue()


def _heatmap(g: dict) -> bytes:
    import matplotlib.pyplot as plt

    counts = np.array(g["zeroed"], dtype=np.int64).reshape(len(g["layers"]), len(g["kinds"]))  # [layers, kinds]
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(g["kinds"]), 1.4 + 0.28 * len(g["layers"])))
    im = ax.imshow(counts, cmap="Reds", aspect="auto", vmin=0)
    ax.set_xticks(range(len(g["kinds"])), g["kinds"])
    ax.set_yticks(range(len(g["layers"])), [str(x) for x in g["layers"]], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    if counts.size <= 400:
        top = counts.max() or 1
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, f"{c:,}", ha="center", va="center", fontsize=6, color="white" if c > top / 2 else "black")
    fig.colorbar(im, ax=ax, label="zeroed weights")
    ax.set_title(f"zeroed weights per layer and module ({int(counts.sum()):,} in all)", fontsize=9)
    return _png(fig)


def _distributions(report: Report, bins: int) -> bytes:
    """Per score file: histogram of log10 of every stored (top-K) score, split into the entries inside their
    tensor's top set (rank < floor(f·n)) and the rest; the line is the median over tensors of the cut-off
    score (the k-th largest), the band its range."""
    import matplotlib.pyplot as plt

    sets = report.sets
    allv = np.concatenate([s.log_scores for s in sets]) if sets else np.zeros(0)
    lo, hi = (float(allv.min()), float(allv.max())) if len(allv) else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    fig, axes = plt.subplots(len(sets), 1, figsize=(9, 2.2 * len(sets) + 0.6), sharex=True, squeeze=False)
    for ax, s in zip(axes[:, 0], sets):
        name = "p" if s.role == "retain" else "q"
        ax.hist(
            [s.log_scores[~s.in_top], s.log_scores[s.in_top]],
            bins=edges,
            stacked=True,
            color=["lightgrey", "tab:green" if s.role == "retain" else "tab:red"],
            label=["stored (top-K), not in the top set", f"in the top-{name} set"],
        )
        if len(s.cutoffs):
            ax.axvspan(s.cutoffs.min(), s.cutoffs.max(), color="black", alpha=0.08, label="cut-off range over tensors")
            ax.axvline(np.median(s.cutoffs), color="black", linestyle="--", linewidth=1, label="median cut-off")
        ax.set_yscale("log")
        ax.set_ylabel("entries")
        ax.set_title(
            f"{s.label} ({s.role}, {name} = {s.fraction:g}): {int(s.in_top.sum()):,} of {len(s.log_scores):,} "
            "stored entries in the top set",
            fontsize=8,
        )
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("log10 score")
    return _png(fig)


def _bars(rows: list[dict]) -> bytes:
    import matplotlib.pyplot as plt

    groups = [[r for r in rows if r["metric"] == "perplexity"], [r for r in rows if r["metric"] != "perplexity"]]
    groups = [g for g in groups if g]
    widths = [max(len(g), 1.5) for g in groups]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(2 + 2.4 * sum(widths), 3.6), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, g in zip(axes[0], groups):
        x = np.arange(len(g))
        for dx, side, color in ((-0.2, "before", "tab:grey"), (0.2, "after", "tab:blue")):
            vals = [r[side] for r in g]
            have = [i for i, v in enumerate(vals) if v is not None]
            bars = ax.bar(x[have] + dx, [vals[i] for i in have], width=0.4, color=color, label=side)
            ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(x, [r["metric"] + (f"\n{r['set']}" if r["set"] else "") for r in g], fontsize=7)
        ax.set_xlim(-0.8, len(g) - 0.2)  # one group alone would stretch its bars across the panel
        ax.set_ylabel("perplexity" if g[0]["metric"] == "perplexity" else "rate")
        ax.legend(fontsize=7)
    fig.suptitle("before / after the patch", fontsize=9)
    return _png(fig)
