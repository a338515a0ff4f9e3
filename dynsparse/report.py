"""``dynsparse report RUNS...``: compare finished runs in a markdown and CSV table and in plots.

Runs are grouped by model, method label (with the budget when it is not the per-type default
and ``no BN`` for an MLP without batch norm, e.g. ``rigl (erk)``) and nominal sparsity; the
table gives the final test
top-1 as mean +- std over seeds (sample std, n-1), the learnable parameter count, and the
published number with its source where there is one. Plots (PNG):

* ``accuracy_vs_params_{model}.png``: accuracy against learnable parameters per method (Fig. 2);
* ``density_{model}.png``: per-layer density over training of the DSR runs (Fig. 3);
* ``curves_{model}.png``: test top-1 per epoch per method, one panel per sparsity.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from dynsparse.errors import DynsparseError
from dynsparse.flops import model_layer_flops, training_multiplier
from dynsparse.io import atomic_write_bytes, atomic_write_text
from dynsparse.legacy import METHODS
from dynsparse.published import published
from dynsparse.schedule import load_schedules

METHOD_ORDER = ["dense", "thin dense", "prune", "dsr", "rigl", "snfs", "set", "deepr", "static", "tied"]


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DynsparseError(f"{p} does not exist")
        runs += [p] if (p / "summary.json").is_file() else sorted(s.parent for s in p.rglob("summary.json"))
    if not runs:
        raise DynsparseError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def load_summary(run: Path) -> dict:
    try:
        s = json.loads((run / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DynsparseError(f"{run / 'summary.json'} is unreadable: {e}") from None
    s["_dir"] = str(run)
    return s


def _order(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def group_runs(summaries: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        label = s.get("label", s["method"])
        if label == "thin dense":  # thin dense runs differ by width, not sparsity
            label = f"thin dense x{s['config']['widen_factor']:g}"
        cfg = s.get("config") or {}
        qualifiers = []  # settings that change the experiment, so that such runs are never pooled with the others
        if cfg.get("budget", "type") != "type" and s["method"] not in ("dense", "tied"):
            qualifiers.append(cfg["budget"])
        if cfg.get("no_batch_norm") and s["model"] == "mnist_mlp":
            qualifiers.append("no BN")
        if qualifiers:  # e.g. "rigl (erk)", "snfs (no BN)"
            label = f"{label} ({', '.join(qualifiers)})"
        sparsity = None if label.startswith(("dense", "thin")) else round(float(s.get("sparsity", 0.0)), 4)
        groups[(s["model"], label, sparsity)].append(s)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1].split(" (")[0].split(" x")[0]), kv[0][1],
                                                        kv[0][2] or 0.0)))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def flops_multiplier(summary: dict) -> float | None:
    """Training FLOPs relative to dense (RigL paper's counting), from the run's densities per epoch."""
    cfg = summary.get("config") or {}
    if "model" not in cfg:
        return None
    period = cfg.get("update_period")  # RigL/SNFS's own period, else the schedule's
    if not period:
        try:
            period = load_schedules(cfg.get("schedule_file")).rewire_period_at(0) if cfg.get("schedule_file") else 100
        except DynsparseError:
            period = 100
    densities = [r["densities"] for r in summary["history"] if "densities" in r]
    method = METHODS.get(summary["method"])
    if method is None or (not densities and method.cost != "dense"):
        return None
    return training_multiplier(summary["method"], model_layer_flops(cfg), densities, period=period,
                               update_end=cfg.get("update_end", 0.75))


def table_rows(groups: dict[tuple, list[dict]]) -> list[dict]:
    rows = []
    for (model, label, sparsity), runs in groups.items():
        acc_m, acc_s = _mean_std([r["test_top1"] for r in runs])
        best_m, _ = _mean_std([r["best_test_top1"] for r in runs])
        params = statistics.fmean(r.get("params_learnable", r["params_nonzero"]) for r in runs)
        pub = published(model, label, sparsity)
        mults = [m for m in map(flops_multiplier, runs) if m is not None]
        rows.append({"model": model, "method": label, "sparsity": sparsity, "seeds": len(runs),
                     "test_top1_mean": round(acc_m, 3), "test_top1_std": round(acc_s, 3),
                     "best_test_top1_mean": round(best_m, 3), "params_learnable": round(params),
                     "train_flops_x_dense": round(statistics.fmean(mults), 4) if mults else None,
                     "published_top1": pub[0] if pub else None, "published_source": pub[1] if pub else None,
                     "delta_vs_published": round(acc_m - pub[0], 3) if pub else None,
                     "runs": [Path(r["_dir"]).name for r in runs]})
    return rows


def markdown(rows: list[dict], title: str, figures: list[Path]) -> str:
    out = [f"# {title}", "", "Final test top-1 (%), mean +- std over seeds; `published` is another "
           "implementation's or the paper's number (source column). Training FLOPs are relative to dense "
           "training, counted as in the RigL paper (`dynsparse/flops.py`; pruning excludes its dense pre-training).", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        out += [f"## {model}", "", "| method | sparsity | seeds | test top-1 | best-epoch top-1 | learnable params "
                "| train FLOPs (x dense) | published | delta | source |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            pub = "" if r["published_top1"] is None else f"{r['published_top1']:.2f}"
            delta = "" if r["delta_vs_published"] is None else f"{r['delta_vs_published']:+.2f}"
            sp = "-" if r["sparsity"] is None else f"{r['sparsity']:g}"
            fl = "" if r["train_flops_x_dense"] is None else f"{r['train_flops_x_dense']:.3f}"
            out.append(f"| {r['method']} | {sp} | {r['seeds']} | {r['test_top1_mean']:.2f} +- {r['test_top1_std']:.2f} "
                       f"| {r['best_test_top1_mean']:.2f} | {r['params_learnable']:,} | {fl} | {pub} | {delta} "
                       f"| {r['published_source'] or ''} |")
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    return "\n".join(out)


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = [k for k in rows[0] if k != "runs"] + ["runs"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "runs": " ".join(r["runs"])})
    return buf.getvalue()


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plots(rows: list[dict], groups: dict[tuple, list[dict]], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DynsparseError("plots need matplotlib: pip install 'dynsparse[plots]'") from None
    figures = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = list(dict.fromkeys(r["method"] for r in mrows))
        colors = plt.get_cmap("tab20" if len(methods) > 10 else "tab10").colors
        for i, method in enumerate(methods):
            pts = sorted((r["params_learnable"], r["test_top1_mean"], r["test_top1_std"], r["published_top1"])
                         for r in mrows if r["method"] == method)
            xs, ys, es, pubs = zip(*pts)
            line = ax.errorbar(xs, ys, yerr=es, marker="osD^vP*Xh<>"[i % 11], capsize=3, label=method,
                               color=colors[i % len(colors)], linestyle="--" if " (" in method else "-")
            pub_pts = [(x, p) for x, p in zip(xs, pubs) if p is not None]
            if pub_pts:
                ax.scatter(*zip(*pub_pts), marker="x", color=line[0].get_color(), label=f"{method} (published)")
        ax.set_xscale("log")
        ax.set_xlabel("learnable parameters")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{model}: accuracy against parameter count")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        figures.append(_save(fig, out / f"accuracy_vs_params_{model}.png"))
        plt.close(fig)
        figures += _density_plot(plt, model, groups, out) + _curves_plot(plt, model, groups, out)
    return figures


def _density_plot(plt, model: str, groups: dict, out: Path) -> list[Path]:
    dsr = sorted((k[2], runs[0]) for k, runs in groups.items() if k[0] == model and k[1] == "dsr")
    panels = []
    for sparsity, run in dsr:
        path = Path(run["_dir"]) / "reallocations.jsonl"
        if path.is_file():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if events:
                panels.append((sparsity, run, events))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (sparsity, run, events) in zip(axes[0], panels):
        steps = [e["step"] for e in events]
        for layer in events[0]["densities"]:
            ax.plot(steps, [e["densities"][layer] for e in events], label=layer)
        ax.set_yscale("log")
        ax.set_title(f"sparsity {sparsity:g} ({Path(run['_dir']).name})", fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("layer density")
        if len(events[0]["densities"]) <= 8:
            ax.legend(fontsize=6)
    fig.suptitle(f"{model}: per-layer density under DSR")
    path = _save(fig, out / f"density_{model}.png")
    plt.close(fig)
    return [path]


def _curves_plot(plt, model: str, groups: dict, out: Path) -> list[Path]:
    keys = [k for k in groups if k[0] == model]
    sparsities = sorted({k[2] for k in keys if k[2] is not None}) or [None]
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4 * len(sparsities), 3.5), squeeze=False, sharey=True)
    for ax, sparsity in zip(axes[0], sparsities):
        for k in sorted(keys, key=lambda k: _order(k[1])):
            if k[2] != sparsity and not (k[1] == "dense" and k[2] is None):
                continue
            runs = groups[k]
            n = min(len(r["history"]) for r in runs)
            curve = [statistics.fmean(r["history"][i]["test_top1"] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), curve, label=k[1])
        ax.set_title("dense" if sparsity is None else f"sparsity {sparsity:g}", fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{model}: learning curves (mean over seeds)")
    path = _save(fig, out / f"curves_{model}.png")
    plt.close(fig)
    return [path]


def build_report(paths: Sequence[str | Path], out: str | Path, *, title: str = "dynsparse report") -> list[Path]:
    """Write ``report.md``, ``results.csv`` and the PNG plots to ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs([load_summary(r) for r in find_runs(paths)])
    rows = table_rows(groups)
    figures = plots(rows, groups, out)
    atomic_write_text(out / "results.csv", write_csv(rows))
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(rows, title, figures))
    return [out / "report.md", out / "results.csv", *figures]
