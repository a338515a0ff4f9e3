"""The report's figures (PNG), drawn with matplotlib when it is installed.

* ``accuracy_vs_params_{model}.png``: final test top-1 (mean +- std over seeds) against learnable
  parameters, one series per method, published numbers as crosses in the method's colour (one
  legend entry for all of them). The y axis shows the band where most results lie; means below
  it are drawn as triangles on the bottom edge, without error bar; a spread wider than the band
  is written beside its point instead of drawn; the series are spread sideways by a few percent so that
  methods of equal parameter count do not hide each other.
* ``density_{model}.png``: per-layer density over training of one DSR run per sparsity (Fig. 3).
* ``curves_{model}.png``: test top-1 per epoch (mean over seeds), one panel per sparsity, epochs
  numbered from 0 as the console and ``metrics.jsonl`` number them.

Every series of a model keeps one style in all figures; no two series share a colour and line
style (14 distinct colours, then the line style changes), and every point has a marker, so a
one-epoch run is a visible point, not an empty line.
"""
from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from dynsparse.outputs.atomic import atomic_write_bytes

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#b8860b", "#000080", "#66c2a5"]
MARKERS = "osD^vP*Xh<>p"
LINESTYLES = ["-", "--", ":", "-."]


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def styles(labels: list[str]) -> dict[str, dict]:
    """A distinct (colour, marker, line style) per label; variants (``x (erk)``) are dashed."""
    out = {}
    for i, label in enumerate(labels):
        ls = LINESTYLES[(i // len(COLOURS) + (" (" in label)) % len(LINESTYLES)]
        out[label] = {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)], "linestyle": ls}
    return out


def dodge(i: int, n: int, step: float = 0.04) -> float:
    """The factor that moves series ``i`` of ``n`` sideways on a log axis, centred on 1."""
    return (1 + step) ** (i - (n - 1) / 2)


def y_band(values: list[float]) -> tuple[float, float]:
    """The y range that shows where most values lie: up to the best, down to twice the spread of
    the upper three quarters below it (all of them when they already fit)."""
    vals = sorted(values)
    hi, q1 = vals[-1], vals[len(vals) // 4]
    lo = max(vals[0], hi - 2 * max(hi - q1, 0.5))
    pad = 0.05 * max(hi - lo, 0.5)
    return lo - pad, hi + pad


def _grid(plt, n: int, **kw):
    """Panels in rows of at most three (readable when the page scales the figure down); the
    unused cells are blank, flattened into one list."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, **kw)
    axes = list(axes.flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes


def _portable(model: str) -> str:
    """A model name fit for a file name: ``torchvision:resnet18`` -> ``torchvision-resnet18``."""
    return model.replace(":", "-").replace("/", "-")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def draw_all(rows: list[dict], groups: dict[tuple, list[dict]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        style = styles(list(dict.fromkeys(r["method"] for r in mrows)))
        figures.append(_accuracy_plot(plt, model, mrows, style, out))
        figures += _density_plot(plt, model, groups, out) + _curves_plot(plt, model, groups, style, out)
    return figures


def _accuracy_plot(plt, model: str, mrows: list[dict], style: dict, out: Path) -> Path:
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(8, 5))
    values = [r["test_top1_mean"] for r in mrows] + [r["published_top1"] for r in mrows if r["published_top1"]]
    lo, hi = y_band(values)
    below, clipped = False, False
    for i, (method, st) in enumerate(style.items()):
        pts = sorted((r["params_learnable"], r["test_top1_mean"], r["test_top1_std"], r["published_top1"])
                     for r in mrows if r["method"] == method)
        xs, ys, es, pubs = zip(*pts)
        # methods at one sparsity have about the same parameter count: spread them sideways
        # (a few percent on the log axis) so that their markers do not hide each other
        xs = tuple(x * dodge(i, len(style)) for x in xs)
        # an error bar taller than the band would cross the whole plot: its spread is written
        # instead; a mean below the band is a triangle on the edge, without a bar (see the table)
        big = [(x, y, e) for x, y, e in zip(xs, ys, es) if 2 * e > hi - lo and y >= lo]
        es = tuple(0.0 if 2 * e > hi - lo or y < lo else e for y, e in zip(ys, es))
        ax.errorbar(xs, ys, yerr=es, capsize=3, label=method, markersize=5, **st)
        for x, y, e in big:
            clipped = True
            ax.annotate(f"+-{e:.1f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=st["color"])
        low = [(x, lo) for x, y in zip(xs, ys) if y < lo]
        if low:
            below = True
            ax.scatter(*zip(*low), marker="v", s=45, color=st["color"], clip_on=False, zorder=5)
        pub = [(x, max(p, lo)) for x, p in zip(xs, pubs) if p is not None]
        below = below or any(p < lo for p in pubs if p is not None)
        if pub:
            ax.scatter(*zip(*pub), marker="x", s=50, color=st["color"], clip_on=False, zorder=5)
    ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_xlabel("learnable parameters (log scale; methods spread sideways by a few % to stay visible)")
    ax.set_ylabel("final test top-1 (%), mean +- std over seeds")
    ax.set_title(f"{model}: accuracy against parameter count")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    extra = [(Line2D([], [], marker="x", color="0.3", linestyle="none"), "published (method's colour)")]
    if clipped:
        extra.append((Line2D([], [], color="none"), "+-N: std too wide to draw (no bar)"))
    if below:
        extra.append((Line2D([], [], marker="v", color="0.3", linestyle="none"),
                      f"on the bottom edge: below {lo:.1f}% (see table)"))
    ax.legend(handles + [h for h, _ in extra], labels + [lab for _, lab in extra], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    path = _save(fig, out / f"accuracy_vs_params_{_portable(model)}.png")
    plt.close(fig)
    return path


def _density_plot(plt, model: str, groups: dict, out: Path) -> list[Path]:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    dsr = sorted(((k[2], runs[0]) for k, runs in groups.items() if k[0] == model and k[1] == "dsr"),
                 key=lambda p: p[0] or 0.0)
    panels = []
    for sparsity, run in dsr:
        path = Path(run["_dir"]) / "reallocations.jsonl"
        if path.is_file():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if events:
                panels.append((sparsity, run, events))
    if not panels:
        return []
    fig, axes = _grid(plt, len(panels))
    for ax, (sparsity, run, events) in zip(axes, panels):
        steps = [e["step"] for e in events]
        for layer in events[0]["densities"]:
            ax.plot(steps, [e["densities"][layer] for e in events], label=layer)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"sparsity {sparsity:g} ({Path(run['_dir']).name})", fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("layer density (log scale)")
        ax.grid(alpha=0.3, which="both")
        if len(events[0]["densities"]) <= 8:
            ax.legend(fontsize=6)
    fig.suptitle(f"{model}: per-layer density under DSR (one seed per panel)")
    fig.tight_layout()
    path = _save(fig, out / f"density_{_portable(model)}.png")
    plt.close(fig)
    return [path]


def _curves_plot(plt, model: str, groups: dict, style: dict, out: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator
    keys = [k for k in groups if k[0] == model]
    sparsities = sorted({k[2] for k in keys if k[2] is not None}) or [None]
    curves = {}
    for k in keys:
        runs = groups[k]
        n = min(len(r["history"]) for r in runs)
        if n:
            curves[k] = ([runs[0]["history"][i]["epoch"] for i in range(n)],
                         [statistics.fmean(r["history"][i]["test_top1"] for r in runs) for i in range(n)])
    if not curves:
        return []
    lo, hi = y_band([c[1][-1] for c in curves.values()])
    fig, axes = _grid(plt, len(sparsities), sharey=True)
    legend: dict = {}
    for ax, sparsity in zip(axes, sparsities):
        for k in keys:  # dense runs (no sparsity) appear in every panel as the reference
            if k in curves and (k[2] == sparsity or k[2] is None):
                (line,) = ax.plot(*curves[k], markersize=3, **style[k[1]])
                legend.setdefault(k[1], line)
        ax.set_title("dense" if sparsity is None else f"sparsity {sparsity:g}", fontsize=9)
        ax.set_xlabel("epoch (from 0, as in the console)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylim(lo, hi)
    for ax in axes[::3]:
        ax.set_ylabel("test top-1 (%), mean over seeds")
    labels = [label for label in style if label in legend]
    spare = axes[len(sparsities):]
    if spare:  # the legend fills the empty cell of the grid
        spare[0].legend([legend[label] for label in labels], labels, fontsize=8, loc="center")
    else:
        fig.legend([legend[label] for label in labels], labels, fontsize=7, loc="center left",
                   bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{model}: learning curves (y axis from {lo:.1f}%: lower values run off the bottom)")
    fig.tight_layout()
    path = _save(fig, out / f"curves_{_portable(model)}.png")
    plt.close(fig)
    return [path]
