"""``dynsparse report RUNS...``: compare finished runs in a markdown and CSV table and in plots.

Runs are grouped by model, method label and nominal sparsity *and* by every saved setting that
can change the result (:func:`result_settings`: epochs, schedule file, batch size, learning
rate, budget, batch norm, widths, the method's own settings, ...); only the seed and settings
that cannot change the numbers (paths, names, workers, device, progress) may differ inside a
group. When groups of one method and sparsity differ in some setting, their labels name it
(``dsr (epochs 1)``); a budget other than the per-type default and an MLP without batch norm are
always named (``rigl (erk)``, ``snfs (no BN)``), and so is a data set other than the model's
own (``dsr (fashion_mnist)``, never compared with a published number). Two runs of one group
with the same seed are one measurement: the most recent is kept and the other listed as
excluded, with the reason.

The table gives the final test top-1 as mean +- std over seeds (sample std, n-1), the
best-epoch number (chosen on the validation split when the runs have one, else on the test set
and called an oracle), the learnable parameter count, the training FLOPs, and the published
number with the implementation and protocol it comes from. Plots (PNG, with matplotlib) are
described in :mod:`dynsparse.experiments.plots`; without matplotlib the tables are still written.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from dynsparse.errors import DynsparseError
from dynsparse.experiments.flops import model_layer_flops, training_multiplier
from dynsparse.experiments.published import PUBLISHED_NAME, architecture, published
from dynsparse.outputs.atomic import atomic_write_text
from dynsparse.training.config import model_dataset
from dynsparse.training.engine_adapter import METHODS
from dynsparse.training.epoch_schedules import load_schedules

log = logging.getLogger(__name__)


def method_order() -> list[str]:
    """The report's order of methods: the registry's (registration order, dense first and tied
    last), with thin dense after dense; a plugin's methods appear once it is imported."""
    return ["dense", "thin dense", *(m for m in METHODS if m != "dense")]


# Saved settings that cannot change a run's numbers: names and paths (a prune run's --resume
# names its own seed's dense run; a continued run names itself), hardware and speed options
# (the README's list of what may change when a run continues), console options.
NO_EFFECT = frozenset({"seed", "name", "job_idx", "data", "runs_dir", "workers", "progress", "overwrite",
                       "resume", "start_epoch", "device", "print_freq", "compile", "channels_last", "threads",
                       "logger", "config", "dry_run"})


def _defaults() -> dict:
    from dynsparse.training.config import TrainConfig
    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(TrainConfig)}


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return v


def result_settings(summary: dict) -> dict:
    """Every saved setting of a run that can change its result, with TrainConfig's defaults for
    settings that did not exist when the run was made, plus the number of epochs it trained."""
    cfg = {**_defaults(), **(summary.get("config") or {})}
    out = {k: _hashable(v) for k, v in cfg.items() if k not in NO_EFFECT}
    # another run's mask is a setting; which run it was is a path, like --resume
    out["copy_mask_from"] = bool(cfg.get("copy_mask_from"))
    if out.get("schedule_file"):  # bundled files are found by name from any directory
        out["schedule_file"] = Path(str(out["schedule_file"])).name
    out["trained_epochs"] = summary.get("epochs", len(summary.get("history") or []))
    return out


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
        s["_mtime"] = os.stat(run / "summary.json").st_mtime
    except (OSError, json.JSONDecodeError) as e:
        raise DynsparseError(f"{run / 'summary.json'} is unreadable: {e}") from None
    if not isinstance(s, dict) or "test_top1" not in s or "model" not in s:
        raise DynsparseError(f"{run / 'summary.json'} is not a dynsparse run summary (no model or test_top1)")
    s["_dir"] = str(run)
    return s


def _order(label: str) -> int:
    method = label.split(" (")[0].split(" x")[0]
    order = method_order()
    return order.index(method) if method in order else len(order)


def base_label(s: dict) -> str:
    """The method label with the qualifiers that are always shown (budget, no BN, thin-dense width)."""
    cfg = s.get("config") or {}
    label = s.get("label", s["method"])
    if label == "thin dense":  # thin dense runs differ by width, not sparsity
        label = f"thin dense x{cfg.get('widen_factor', 10.0):g}"
    qualifiers = []
    if cfg.get("budget", "type") != "type" and s["method"] not in ("dense", "tied"):
        qualifiers.append(cfg["budget"])
    if cfg.get("no_batch_norm") and s["model"] == "mnist_mlp":
        qualifiers.append("no BN")
    if cfg.get("dataset"):  # another data set than the model's own (--dataset fashion_mnist)
        qualifiers.insert(0, cfg["dataset"])
    shape = architecture(s["model"], cfg, thin_dense=s.get("label") == "thin dense")
    if shape:  # another network than the published one: named, and never beside a published number
        qualifiers.insert(0, shape)
    return f"{label} ({', '.join(qualifiers)})" if qualifiers else label


def _recency(s: dict) -> tuple:
    return ((s.get("evidence") or {}).get("time") or "", s["_mtime"])


def _describe(key: str, value) -> str:
    if key == "trained_epochs":
        return f"{value} epochs trained"
    return f"{key.replace('_', '-')} {value if not isinstance(value, bool) else str(value).lower()}"


def group_runs(summaries: list[dict]) -> tuple[dict[tuple, list[dict]], list[dict]]:
    """``({(model, label, sparsity): runs}, excluded)``: one group per distinct setting (see the
    module docstring), at most one run per seed in each; ``excluded`` lists ``{"run", "reason"}``."""
    buckets: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        label = base_label(s)
        sparsity = None if label.startswith(("dense", "thin")) else round(float(s.get("sparsity", 0.0)), 4)
        s["_base_label"] = label
        s["_settings"] = result_settings(s)
        buckets[(s["model"], label, sparsity, tuple(sorted(s["_settings"].items(), key=str)))].append(s)
    siblings: dict[tuple, list[tuple]] = defaultdict(list)
    for key in buckets:
        siblings[key[:3]].append(key)
    groups: dict[tuple, list[dict]] = {}
    excluded: list[dict] = []
    for (model, label, sparsity), keys in siblings.items():
        settings = [dict(k[3]) for k in keys]
        differ = [k for k in settings[0] if len({_hashable(s.get(k)) for s in settings}) > 1]
        if "epochs" in differ and "trained_epochs" in differ:  # one says it
            differ.remove("trained_epochs")
        for key, sett in zip(keys, settings):
            full = label
            if differ:
                extra = ", ".join(_describe(k, sett.get(k)) for k in differ)
                full = f"{label[:-1]}, {extra})" if label.endswith(")") else f"{label} ({extra})"
            kept: dict = {}
            for s in sorted(buckets[key], key=_recency, reverse=True):
                seed = s.get("seed", (s.get("config") or {}).get("seed"))
                if seed in kept:
                    excluded.append({"run": s["_dir"], "reason": f"seed {seed} with the same settings as "
                                     f"{kept[seed]['_dir']}, which is more recent and was kept"})
                else:
                    kept[seed] = s
            groups[(model, full, sparsity)] = sorted(kept.values(), key=lambda r: str(r.get("seed")))
    ordered = dict(sorted(groups.items(), key=lambda kv: (kv[0][0], _order(kv[0][1]), kv[0][1], kv[0][2] or 0.0)))
    return ordered, excluded


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
    try:
        layer_flops = model_layer_flops(cfg)
    except (DynsparseError, RuntimeError, ValueError, KeyError):  # a model this version cannot build
        return None
    return training_multiplier(summary["method"], layer_flops, densities, period=period,
                               update_end=cfg.get("update_end", 0.75))


def _round(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(x, n)


def table_rows(groups: dict[tuple, list[dict]]) -> list[dict]:
    rows = []
    for (model, label, sparsity), runs in groups.items():
        acc_m, acc_s = _mean_std([r["test_top1"] for r in runs])
        with_val = [r["test_top1_at_best_val"] for r in runs if r.get("test_top1_at_best_val") is not None]
        val_m = statistics.fmean(with_val) if len(with_val) == len(runs) else None
        oracle_m = statistics.fmean(r["best_test_top1"] for r in runs)
        params = statistics.fmean(r.get("params_learnable", r["params_nonzero"]) for r in runs)
        cfg0 = runs[0].get("config") or {}
        dataset = cfg0.get("dataset") or ""
        shape = architecture(model, cfg0, thin_dense=runs[0].get("label") == "thin dense")
        # published numbers are for each model's own data set and published shape, never another
        pub = None if dataset or shape else published(model, runs[0]["_base_label"], sparsity)
        mults = [m for m in map(flops_multiplier, runs) if m is not None]
        rows.append({"model": model, "dataset": dataset or model_dataset(model) or "", "method": label,
                     "architecture": shape or PUBLISHED_NAME.get(model, model), "sparsity": sparsity,
                     "seeds": len(runs),
                     "epochs": runs[0]["_settings"]["trained_epochs"],
                     "test_top1_mean": round(acc_m, 3), "test_top1_std": round(acc_s, 3),
                     "test_top1_at_best_val_mean": _round(val_m), "oracle_best_test_top1_mean": round(oracle_m, 3),
                     "params_learnable": round(params),
                     "train_flops_x_dense": round(statistics.fmean(mults), 4) if mults else None,
                     "published_top1": pub[0] if pub else None, "published_source": pub[1].key if pub else None,
                     "delta_vs_published": round(acc_m - pub[0], 3) if pub else None,
                     "runs": [Path(r["_dir"]).name for r in runs],
                     "seed_list": sorted(r.get("seed", 0) for r in runs)})
    return rows


def markdown(rows: list[dict], title: str, figures: list[Path], excluded: list[dict],
             plots_note: str | None = None) -> str:
    from dynsparse.experiments.published import SOURCES
    out = [f"# {title}", "", "Final test top-1 (%), mean +- std over seeds. Runs are grouped by every setting that can "
           "change the result; a setting in parentheses tells groups of one method and sparsity apart. Training "
           "FLOPs are relative to dense training, counted as in the RigL paper "
           "(`dynsparse/experiments/flops.py`; pruning excludes its dense pre-training). `published` is someone "
           "else's number: the key names where it comes from (below the table); it was not made with dynsparse or "
           "with our training protocol.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        val = any(r["test_top1_at_best_val_mean"] is not None for r in mrows)
        oracle = not all(r["test_top1_at_best_val_mean"] is not None for r in mrows)
        heads = ["method", "sparsity", "seeds", "epochs", "test top-1 (final)"]
        heads += ["test top-1 at best val epoch"] * val + ["best test (oracle)"] * oracle
        heads += ["learnable params", "train FLOPs (x dense)", "published", "delta"]
        out += [f"## {model}", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for r in mrows:
            cells = [r["method"], "-" if r["sparsity"] is None else f"{r['sparsity']:g}", str(r["seeds"]),
                     str(r["epochs"]), f"{r['test_top1_mean']:.2f} +- {r['test_top1_std']:.2f}"]
            if val:
                v = r["test_top1_at_best_val_mean"]
                cells.append("" if v is None else f"{v:.2f}")
            if oracle:
                cells.append(f"{r['oracle_best_test_top1_mean']:.2f}")
            cells += [f"{r['params_learnable']:,}",
                      "" if r["train_flops_x_dense"] is None else f"{r['train_flops_x_dense']:.3f}",
                      "" if r["published_top1"] is None else f"{r['published_top1']:.2f} [{r['published_source']}]",
                      "" if r["delta_vs_published"] is None else f"{r['delta_vs_published']:+.2f}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if oracle:
            out += ["*best test (oracle)*: the test top-1 of the epoch with the highest test top-1, i.e. the epoch "
                    "was chosen by looking at the test set. It is an upper bound, not a result; runs with "
                    "`--validate-set` choose the epoch on the validation split instead.", ""]
        for key in dict.fromkeys(r["published_source"] for r in mrows if r["published_source"]):
            out += [f"[{key}] {SOURCES[key].description} Source: {SOURCES[key].file}.", ""]
    if excluded:
        out += ["## Excluded runs", ""] + [f"* `{e['run']}`: {e['reason']}" for e in excluded] + [""]
    if figures:
        out += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    elif plots_note:
        out += ["## Figures", "", plots_note, ""]
    return "\n".join(out)


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = [k for k in rows[0] if k not in ("runs", "seed_list")] + ["seed_list", "runs"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "runs": " ".join(r["runs"]), "seed_list": " ".join(map(str, r["seed_list"]))})
    return buf.getvalue()


def build_report(paths: Sequence[str | Path], out: str | Path, *, title: str = "dynsparse report") -> list[Path]:
    """Write ``report.md``, ``results.csv``, ``results.json`` and, with matplotlib, the PNG plots
    to ``out``; returns their paths. Nothing is created when the runs cannot be read."""
    from dynsparse.experiments import plots
    out = Path(out)
    groups, excluded = group_runs([load_summary(r) for r in find_runs(paths)])
    rows = table_rows(groups)
    if out.exists() and not out.is_dir():
        raise DynsparseError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    figures, note = [], None
    if plots.available():
        figures = plots.draw_all(rows, groups, out)
    else:
        note = "Plots not drawn: matplotlib is not installed (`pip install 'dynsparse[plots]'`)."
        log.warning("tables written; %s", note)
    for e in excluded:
        log.warning("excluded %s: %s", e["run"], e["reason"])
    atomic_write_text(out / "results.csv", write_csv(rows))
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(rows, title, figures, excluded, note))
    return [out / "report.md", out / "results.csv", out / "results.json", *figures]
