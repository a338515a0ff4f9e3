"""The report: tables, grouping by every setting that changes a result, one run per seed, the
published column, the oracle/validation best-epoch column, tables without matplotlib, plots."""
from __future__ import annotations

import csv
import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dynsparse.cli.commands import main
from dynsparse.errors import DynsparseError
from dynsparse.experiments import plots
from dynsparse.experiments.report import build_report, group_runs, load_summary, result_settings


def fake_run(root: Path, name: str, method: str, sparsity: float, seed: int, acc: float, params: int, *,
             epochs: int = 3, time: str = "2026-01-01T00:00:00+0000", val: bool = False, **config) -> Path:
    d = root / name
    d.mkdir(parents=True)
    history = [{"epoch": e, "test_top1": acc - 2 + e} for e in range(epochs)]
    s = {"run": name, "model": "mnist_mlp", "method": method, "label": method, "sparsity": sparsity, "seed": seed,
         "epochs": epochs, "test_top1": acc, "best_test_top1": acc + 0.1, "params_nonzero": params,
         "params_learnable": params, "history": history, "evidence": {"time": time},
         "config": {"widen_factor": 10.0, "model": "mnist_mlp", "schedule_file": None, "epochs": epochs,
                    "seed": seed, "name": name, **config}}
    if val:
        s.update({"best_val_top1": acc + 0.3, "test_top1_at_best_val": acc - 0.05})
    if method != "dense":
        for row in history:
            row["densities"] = {"fc1.weight": 0.02, "fc_int.weight": 0.02, "fc2.weight": 0.02}
    (d / "summary.json").write_text(json.dumps(s))
    if method == "dsr":
        events = [{"step": 100 * i, "densities": {"fc1.weight": 0.02 - 0.001 * i, "fc2.weight": 0.02 + 0.01 * i}}
                  for i in range(1, 4)]
        (d / "reallocations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return d


def rows_of(out: Path) -> dict[str, dict]:
    return {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}


def test_report_tables_and_plots(tmp_path):
    runs = tmp_path / "runs"
    accs = {"dsr": [98.0, 98.2, 98.1], "static": [90.0, 91.0, 92.0]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(runs, f"{method}_{seed}", method, 0.98, seed, acc, 6144, data=f"/data{seed}", workers=seed)
    fake_run(runs, "dense_0", "dense", 0.0, 0, 98.5, 267020)
    paths = build_report([runs], tmp_path / "report", title="test")
    names = {p.name for p in paths}
    assert {"report.md", "results.csv", "accuracy_vs_params_mnist_mlp.png", "density_mnist_mlp.png",
            "curves_mnist_mlp.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = rows_of(tmp_path / "report")
    assert float(rows["dsr"]["test_top1_mean"]) == pytest.approx(98.1)
    assert float(rows["static"]["test_top1_std"]) == pytest.approx(statistics.stdev([90.0, 91.0, 92.0]), abs=1e-3)
    assert float(rows["dsr"]["published_top1"]) == 98.14 and rows["dsr"]["seeds"] == "3"  # paths/workers pooled
    assert rows["dsr"]["published_source"] == "SL-MNIST" and rows["dsr"]["seed_list"] == "0 1 2"
    assert float(rows["dsr"]["train_flops_x_dense"]) == pytest.approx(0.02)
    assert float(rows["dense"]["train_flops_x_dense"]) == 1.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| dsr | 0.98 | 3 | 3 | 98.10 +- 0.10 | 98.20 | 6,144 | 0.020 | 98.14 [SL-MNIST] | -0.04 |" in md
    # the published column says in words which implementation and protocol a number comes from
    assert "[SL-MNIST] a results table in Dettmers & Zettlemoyer's sparse_learning repository, not dynsparse" in md
    assert "own MNIST protocol (LeNet-300-100 without batch norm" in md and "MNIST_sparse_summary" in md
    # no validation split: the best-epoch number is named an oracle and explained
    assert "best test (oracle)" in md and "chosen by looking at the test set" in md
    assert "Excluded runs" not in md


def test_runs_that_differ_in_any_result_setting_are_never_pooled(tmp_path):
    """The issue's case: a 1-epoch and a 2-epoch run, both seed 0, were averaged as "2 seeds"."""
    runs = tmp_path / "runs"
    fake_run(runs, "e1", "dsr", 0.98, 0, 90.0, 6144, epochs=1)
    fake_run(runs, "e2", "dsr", 0.98, 0, 95.0, 6144, epochs=2)
    fake_run(runs, "lr", "dsr", 0.98, 0, 94.0, 6144, epochs=2, lr=0.05)
    fake_run(runs, "sched", "set", 0.98, 0, 93.0, 6144, schedule_file="a/one.yaml")
    fake_run(runs, "sched2", "set", 0.98, 1, 93.0, 6144, schedule_file="b/two.yaml")
    build_report([runs], tmp_path / "out")
    rows = rows_of(tmp_path / "out")
    assert set(rows) == {"dsr (epochs 1, lr 0.1)", "dsr (epochs 2, lr 0.1)", "dsr (epochs 2, lr 0.05)",
                         "set (schedule-file one.yaml)", "set (schedule-file two.yaml)"}
    assert all(r["seeds"] == "1" for r in rows.values())
    assert rows["dsr (epochs 1, lr 0.1)"]["epochs"] == "1"
    # a variant of a published method still shows the published number with its source
    assert float(rows["dsr (epochs 1, lr 0.1)"]["published_top1"]) == 98.14


def test_result_settings_ignore_what_cannot_change_a_result(tmp_path):
    a = load_summary(fake_run(tmp_path, "a", "dsr", 0.98, 0, 90.0, 6144, data="x", runs_dir="r1", device="cpu",
                              resume="runs/a", job_idx=3, progress=False, workers=0))
    b = load_summary(fake_run(tmp_path, "b", "dsr", 0.98, 1, 90.0, 6144, data="y", runs_dir="r2", device="cuda",
                              job_idx=4))
    assert result_settings(a) == result_settings(b)
    assert {"seed", "name", "data", "runs_dir", "workers", "device", "resume", "job_idx"}.isdisjoint(result_settings(a))
    assert {"epochs", "batch_size", "lr", "weight_decay", "widen_factor", "layers", "no_batch_norm", "drop_fraction",
            "n_prune_params", "rewire_fraction", "update_period", "budget", "schedule_file"} <= set(result_settings(a))


def test_one_seed_is_counted_once_and_the_other_run_is_excluded(tmp_path, caplog):
    runs = tmp_path / "runs"
    old = fake_run(runs, "dsr_old", "dsr", 0.98, 0, 90.0, 6144, time="2026-01-01T00:00:00+0000")
    new = fake_run(runs, "dsr_new", "dsr", 0.98, 0, 97.0, 6144, time="2026-02-01T00:00:00+0000")
    fake_run(runs, "dsr_s1", "dsr", 0.98, 1, 98.0, 6144)
    groups, excluded = group_runs([load_summary(p) for p in sorted(runs.iterdir())])
    assert [r["run"] for r in groups[("mnist_mlp", "dsr", 0.98)]] == ["dsr_new", "dsr_s1"]
    assert excluded == [{"run": str(old), "reason": f"seed 0 with the same settings as {new}, which is more "
                                                    "recent and was kept"}]
    with caplog.at_level(logging.WARNING, logger="dynsparse.experiments.report"):
        build_report([runs], tmp_path / "out")
    row = rows_of(tmp_path / "out")["dsr"]
    assert row["seeds"] == "2" and float(row["test_top1_mean"]) == pytest.approx(97.5)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Excluded runs" in md and f"`{old}`: seed 0 with the same settings" in md
    assert "excluded" in caplog.text and "dsr_old" in caplog.text


def test_validation_chosen_number_is_preferred(tmp_path):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        fake_run(runs, f"v{seed}", "dsr", 0.98, seed, 97.0 + seed, 6144, val=True, validate_set=True)
    build_report([runs], tmp_path / "out")
    row = rows_of(tmp_path / "out")["dsr"]
    assert float(row["test_top1_at_best_val_mean"]) == pytest.approx(97.45)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "test top-1 at best val epoch" in md and "oracle" not in md


def test_tables_without_matplotlib(tmp_path):
    """As after the README's first install command: no matplotlib. The CLI says so and writes the tables."""
    runs = tmp_path / "runs"
    fake_run(runs, "dsr_0", "dsr", 0.98, 0, 98.0, 6144)
    code = ("import sys; sys.modules['matplotlib'] = None; from dynsparse.cli.commands import main; "
            f"sys.exit(main(['report', {str(runs)!r}, '--out', {str(tmp_path / 'out')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "matplotlib is not installed" in done.stderr + done.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.csv", "results.json"]
    assert "Plots not drawn: matplotlib is not installed" in (tmp_path / "out" / "report.md").read_text()


def test_report_keeps_budgets_and_model_variants_apart(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "rigl_type", "rigl", 0.99, 0, 88.0, 3482)
    fake_run(runs, "rigl_erk", "rigl", 0.99, 0, 96.0, 3482, budget="erk")
    fake_run(runs, "rigl_erk_nobn", "rigl", 0.99, 0, 97.0, 3482, budget="erk", no_batch_norm=True)
    build_report([runs], tmp_path / "report", title="budgets")
    rows = rows_of(tmp_path / "report")
    assert set(rows) == {"rigl", "rigl (erk)", "rigl (erk, no BN)"}
    assert float(rows["rigl (erk)"]["test_top1_mean"]) == 96.0 and rows["rigl"]["seeds"] == "1"
    assert rows["rigl (erk)"]["published_top1"] == ""  # a variant is not compared with the plain method's number


def test_report_errors_create_no_output_folder(tmp_path, capsys):
    with pytest.raises(DynsparseError, match="no finished runs"):
        build_report([tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out2")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_plot_styles_are_distinct_and_always_marked():
    labels = [f"m{i}" for i in range(20)] + ["dsr (erk)", "rigl (no BN)"]
    st = plots.styles(labels)
    assert len({(s["color"], s["linestyle"]) for s in st.values()}) == len(labels)
    assert len({s["color"] for s in list(st.values())[:13]}) == 13  # the MNIST report's 13 series
    assert all(s["marker"] for s in st.values())  # a one-epoch run is a visible point


def test_y_band_shows_the_top_range_and_keeps_compact_data_whole():
    lo, hi = plots.y_band([38.7, 66.4, 96.0, 97.1, 97.5, 98.0, 98.2, 98.5, 98.6, 98.75])
    assert 92 < lo < 96 and 98.75 < hi < 99.2  # 38.7 and 66.4 fall below the axis
    lo, hi = plots.y_band([97.0, 97.5, 98.0])
    assert lo < 97.0 and hi > 98.0


def test_density_axis_labels_are_plain_percentages(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    runs = tmp_path / "runs"
    fake_run(runs, "dsr_0", "dsr", 0.98, 0, 98.0, 6144)
    groups, _ = group_runs([load_summary(runs / "dsr_0")])
    captured = []
    monkey_close = plt.close

    def keep(fig):  # read the tick labels before the figure is closed
        fig.canvas.draw()
        captured.extend(t.get_text() for ax in fig.axes for t in ax.get_yticklabels(which="both"))
        monkey_close(fig)
    plt.close = keep
    try:
        plots._density_plot(plt, "mnist_mlp", groups, tmp_path)
    finally:
        plt.close = monkey_close
    texts = [t for t in captured if t]
    assert texts and all(t.endswith("%") and "10^" not in t and "times" not in t for t in texts)


def test_one_epoch_curves_are_drawn_with_markers(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    runs = tmp_path / "runs"
    fake_run(runs, "one", "dsr", 0.98, 0, 98.0, 6144, epochs=1)
    groups, _ = group_runs([load_summary(runs / "one")])
    lines = []
    real_close = plt.close

    def keep(fig):
        lines.extend(ln for ax in fig.axes for ln in ax.get_lines())
        real_close(fig)
    plt.close = keep
    try:
        plots._curves_plot(plt, "mnist_mlp", groups, plots.styles(["dsr"]), tmp_path)
    finally:
        plt.close = real_close
    drawn = [ln for ln in lines if len(ln.get_xdata()) == 1]
    assert drawn and all(ln.get_marker() not in (None, "", "None") for ln in drawn)
    assert list(drawn[0].get_xdata()) == [0]  # epochs from 0, as the console counts


def test_export_runs_copies_summaries_and_dsr_events_and_rejects_bad_input(tmp_path):
    script = Path(__file__).resolve().parents[1] / "experiments" / "export_runs.py"
    runs = tmp_path / "runs"
    fake_run(runs, "dsr_0", "dsr", 0.98, 0, 98.0, 6144)
    fake_run(runs, "static_0", "static", 0.98, 0, 90.0, 6144)
    (runs / "static_0" / "checkpoint.pt").write_bytes(b"big")
    ok = subprocess.run([sys.executable, str(script), str(runs), str(tmp_path / "out")], capture_output=True, text=True)
    assert ok.returncode == 0 and "exported 2 runs" in ok.stdout
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) == \
        ["dsr_0/reallocations.jsonl", "dsr_0/summary.json", "static_0/summary.json"]
    for args in ([], [str(tmp_path / "nothing"), str(tmp_path / "o2")]):
        bad = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.strip()


def test_a_widened_mlp_is_its_own_labelled_row_with_no_published_number(tmp_path):
    """Issue 23 item 1: the committed MNIST runs plus a --hidden-sizes 500,500 DSR run at 0.98. The
    widened run is another network: its row names its shape in md, csv, json and the plot legend,
    and carries no published number; the LeNet-300-100 DSR row keeps its own."""
    runs = tmp_path / "runs"
    committed = Path(__file__).resolve().parent.parent / "docs" / "mnist" / "runs"
    fake_run(runs, "wide_dsr", "dsr", 0.98, 0, 93.5, 16000, hidden_sizes=[500, 500])
    paths = build_report([committed, runs], tmp_path / "report", title="t")
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    wide = [r for r in rows if "784-500-500-10" in r["method"]]
    assert len(wide) == 1 and wide[0]["runs"] == ["wide_dsr"], [r["method"] for r in rows]
    assert wide[0]["method"] == "dsr (MLP 784-500-500-10)" and wide[0]["architecture"] == "MLP 784-500-500-10"
    assert wide[0]["published_top1"] is None and wide[0]["delta_vs_published"] is None
    plain = [r for r in rows if r["method"] == "dsr" and r["sparsity"] == 0.98]
    assert plain and plain[0]["published_top1"] == 98.14 and plain[0]["architecture"] == "LeNet-300-100"
    assert "wide_dsr" not in plain[0]["runs"]
    csv_rows = [r for r in csv.DictReader((tmp_path / "report" / "results.csv").open()) if "500-500" in r["method"]]
    assert csv_rows and csv_rows[0]["published_top1"] == "" and csv_rows[0]["architecture"] == "MLP 784-500-500-10"
    md_line = next(ln for ln in (tmp_path / "report" / "report.md").read_text().splitlines() if "500-500" in ln)
    assert md_line.startswith("| dsr (MLP 784-500-500-10) | 0.98 |") and "SL-MNIST" not in md_line
    if plots.available():  # the accuracy plot's legend names the shape (its label is the row's method)
        assert any(p.name.startswith("accuracy_vs_params") for p in paths)
        assert "dsr (MLP 784-500-500-10)" in plots.styles([r["method"] for r in rows])


def test_architecture_names_only_shapes_that_are_not_the_published_ones():
    from dynsparse.experiments.published import architecture
    assert architecture("mnist_mlp", {}) is None and architecture("mnist_mlp", {"hidden_sizes": [300, 100]}) is None
    assert architecture("mnist_mlp", {"hidden_sizes": [3000, 3000]}) == "MLP 784-3000-3000-10"
    assert architecture("cifar10_WideResNet", {"layers": 28, "widen_factor": 2}) is None
    assert architecture("cifar10_WideResNet", {"layers": 16, "widen_factor": 2}) == "WRN-16-2"
    assert architecture("cifar10_WideResNet", {"layers": 28, "widen_factor": 1}, thin_dense=True) is None
    assert architecture("imagenet_resnet50", {"widen_factor": 2}) == "ResNet-50 x2"
