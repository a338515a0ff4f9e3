"""The sweep runner (selection, skip finished, resume interrupted, Slurm, original lists) and the
report (tables and plots from small synthetic runs)."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from dynsparse.cli import main
from dynsparse.errors import DynsparseError
from dynsparse.report import build_report
from dynsparse.sweep import load_jobs, run_sweep, select

REPO = Path(__file__).resolve().parents[1]


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("jobs:\n" + "".join(f"  - {l}\n" for l in lines))
    return path


def test_original_lists_load_with_their_job_indices():
    wrn = load_jobs(REPO / "experiments" / "original" / "wrnet_experiments.yaml")
    rn = load_jobs(REPO / "experiments" / "original" / "resnet_experiments.yaml")
    assert len(wrn) == 83 and len(rn) == 21
    assert [j.index for j in rn] == list(range(21))
    assert 68 in {j.index for j in wrn}


def test_selection_by_index_range_and_slurm(tmp_path):
    jobs = load_jobs(write_list(tmp_path / "l.yaml", [f"python main.py --job-idx {i}" for i in (0, 1, 2, 5, 7)]))
    assert [j.index for j in select(jobs, job_idx=5, environ={})] == [5]
    assert [j.index for j in select(jobs, index_range="1:6", environ={})] == [1, 2, 5]
    assert [j.index for j in select(jobs, index_range="5:", environ={})] == [5, 7]
    assert [j.index for j in select(jobs, environ={"SLURM_ARRAY_TASK_ID": "7"})] == [7]
    assert [j.index for j in select(jobs, job_idx=0, environ={"SLURM_ARRAY_TASK_ID": "7"})] == [0]
    assert len(select(jobs, environ={})) == 5
    with pytest.raises(DynsparseError, match="no job with index 3"):
        select(jobs, job_idx=3, environ={})
    with pytest.raises(DynsparseError, match="--range must be A:B"):
        select(jobs, index_range="x", environ={})
    with pytest.raises(DynsparseError, match="not an integer"):
        select(jobs, environ={"SLURM_ARRAY_TASK_ID": "a"})


def test_jobs_without_index_use_their_position(tmp_path):
    jobs = load_jobs(write_list(tmp_path / "l.yaml", ["dynsparse train --seed 1", "dynsparse train --seed 2"]))
    assert [j.index for j in jobs] == [0, 1]


@pytest.mark.parametrize("text,needle", [
    ("jobs: [", "not valid YAML"), ("foo: 1", "must have a 'jobs:' list"),
    ("jobs:\n  - echo hi\n", "does not start with"),
    ("jobs:\n  - python main.py --job-idx 1\n  - python main.py --job-idx 1\n", "two jobs have index 1"),
])
def test_bad_lists(tmp_path, text, needle):
    f = tmp_path / "l.yaml"
    f.write_text(text)
    with pytest.raises(DynsparseError, match=needle):
        load_jobs(f)


def test_skips_finished_and_resumes_interrupted(tmp_path):
    runs = tmp_path / "runs"
    lst = write_list(tmp_path / "l.yaml", [f"python main.py --name r{i} --resume elsewhere --job-idx {i}" for i in range(3)])
    (runs / "r0").mkdir(parents=True)
    (runs / "r0" / "summary.json").write_text("{}")
    (runs / "r1").mkdir()
    (runs / "r1" / "checkpoint.pt").write_bytes(b"x")
    calls = []
    outcome = run_sweep(lst, extra=["--runs-dir", str(runs)], echo=lambda s: None,
                        train=lambda cfg, argv: calls.append((cfg.run_name, cfg.resume)))
    assert outcome == {0: "skipped", 1: "resumed", 2: "finished"}
    assert calls == [("r1", str(runs / "r1")), ("r2", "elsewhere")]


def test_a_failing_job_does_not_stop_the_others(tmp_path):
    lst = write_list(tmp_path / "l.yaml", ["python main.py --initial-sparsity-fc 3 --job-idx 0",
                                           "python main.py --name ok --job-idx 1"])
    outcome = run_sweep(lst, extra=["--runs-dir", str(tmp_path)], echo=lambda s: None, train=lambda c, a: None)
    assert outcome[0].startswith("failed: --initial-sparsity-fc must be in [0, 1)") and outcome[1] == "finished"


def test_sweep_end_to_end_on_tiny_mnist(tiny_mnist, tmp_path, capsys):
    lst = write_list(tmp_path / "l.yaml", [
        "dynsparse train --initial-sparsity-fc 0 --epochs 1 -b 32 --name dense",
        "dynsparse train --initial-sparsity-fc 0.5 --prune --prune-target-sparsity-fc 0.8 --prune-iterations 2 "
        "--start-pruning-after-epoch 0 --prune-epoch-frequency 1 --post-prune-epochs 1 --resume runs/dense -b 32 --name pruned",
    ])
    argv = ["sweep", str(lst), "--", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "elsewhere"), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "elsewhere" / "pruned" / "summary.json").read_text())
    assert summary["method"] == "prune" and summary["epochs"] == 2
    assert summary["params_sparse"] == int(0.2 * 235200 + 0.1) + int(0.2 * 30000 + 0.1) + int(0.2 * 1000 + 0.1)
    dense = json.loads((tmp_path / "elsewhere" / "dense" / "summary.json").read_text())
    assert dense["method"] == "dense"
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished") >= 2  # the second pass only reports them as finished


# ---- report ------------------------------------------------------------------------------------

def fake_run(root: Path, name: str, method: str, sparsity: float, seed: int, acc: float, params: int) -> None:
    d = root / name
    d.mkdir(parents=True)
    history = [{"epoch": e, "test_top1": acc - 2 + e} for e in range(3)]
    s = {"run": name, "model": "mnist_mlp", "method": method, "label": method, "sparsity": sparsity, "seed": seed,
         "test_top1": acc, "best_test_top1": acc + 0.1, "params_nonzero": params, "params_learnable": params,
         "history": history, "config": {"widen_factor": 10.0, "model": "mnist_mlp", "schedule_file": None}}
    if method != "dense":
        for row in history:
            row["densities"] = {"fc1.weight": 0.02, "fc_int.weight": 0.02, "fc2.weight": 0.02}
    (d / "summary.json").write_text(json.dumps(s))
    if method == "dsr":
        events = [{"step": 100 * i, "densities": {"fc1.weight": 0.02 - 0.001 * i, "fc2.weight": 0.02 + 0.01 * i}}
                  for i in range(1, 4)]
        (d / "reallocations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_report_tables_and_plots(tmp_path):
    runs = tmp_path / "runs"
    accs = {"dsr": [98.0, 98.2, 98.1], "static": [90.0, 91.0, 92.0]}
    for method, values in accs.items():
        for seed, acc in enumerate(values):
            fake_run(runs, f"{method}_{seed}", method, 0.98, seed, acc, 6144)
    fake_run(runs, "dense_0", "dense", 0.0, 0, 98.5, 267020)
    paths = build_report([runs], tmp_path / "report", title="test")
    names = {p.name for p in paths}
    assert {"report.md", "results.csv", "accuracy_vs_params_mnist_mlp.png", "density_mnist_mlp.png",
            "curves_mnist_mlp.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "report" / "results.csv").open())}
    assert float(rows["dsr"]["test_top1_mean"]) == pytest.approx(98.1)
    assert float(rows["static"]["test_top1_std"]) == pytest.approx(statistics.stdev([90.0, 91.0, 92.0]), abs=1e-3)
    assert float(rows["dsr"]["published_top1"]) == 98.14 and rows["dsr"]["seeds"] == "3"
    assert float(rows["dsr"]["train_flops_x_dense"]) == pytest.approx(0.02) and float(rows["dense"]["train_flops_x_dense"]) == 1.0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| dsr | 0.98 | 3 | 98.10 +- 0.10 | 98.20 | 6,144 | 0.020 | 98.14 | -0.04 |" in md
    assert "MNIST_sparse_summary" in md


def test_report_keeps_budgets_and_model_variants_apart(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "rigl_type", "rigl", 0.99, 0, 88.0, 3482)
    fake_run(runs, "rigl_erk", "rigl", 0.99, 0, 96.0, 3482)
    s = json.loads((runs / "rigl_erk" / "summary.json").read_text())
    s["config"]["budget"] = "erk"
    (runs / "rigl_erk" / "summary.json").write_text(json.dumps(s))
    fake_run(runs, "rigl_erk_nobn", "rigl", 0.99, 0, 97.0, 3482)
    s["config"]["no_batch_norm"] = True
    (runs / "rigl_erk_nobn" / "summary.json").write_text(json.dumps(s))
    build_report([runs], tmp_path / "report", title="budgets")
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "report" / "results.csv").open())}
    assert set(rows) == {"rigl", "rigl (erk)", "rigl (erk, no BN)"}
    assert float(rows["rigl (erk)"]["test_top1_mean"]) == 96.0 and rows["rigl"]["seeds"] == "1"


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(DynsparseError, match="no finished runs"):
        build_report([tmp_path], tmp_path / "out")


def test_export_runs_copies_summaries_and_dsr_events_and_rejects_bad_input(tmp_path):
    import subprocess
    import sys
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
