"""The sweep runner (selection, skip finished, resume interrupted, Slurm, original lists); the
report's tests are in test_report.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynsparse.cli.commands import main
from dynsparse.errors import DynsparseError
from dynsparse.experiments.sweep import load_jobs, run_sweep, select

REPO = Path(__file__).resolve().parents[1]


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("jobs:\n" + "".join(f"  - {ln}\n" for ln in lines))
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
    lst = write_list(tmp_path / "l.yaml",
                     [f"python main.py --name r{i} --resume elsewhere --job-idx {i}" for i in range(3)])
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
        "--start-pruning-after-epoch 0 --prune-epoch-frequency 1 --post-prune-epochs 1 --resume runs/dense -b 32 "
        "--name pruned",
    ])
    argv = ["sweep", str(lst), "--", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "elsewhere"),
            "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "elsewhere" / "pruned" / "summary.json").read_text())
    assert summary["method"] == "prune" and summary["epochs"] == 2
    assert summary["params_sparse"] == int(0.2 * 235200 + 0.1) + int(0.2 * 30000 + 0.1) + int(0.2 * 1000 + 0.1)
    dense = json.loads((tmp_path / "elsewhere" / "dense" / "summary.json").read_text())
    assert dense["method"] == "dense"
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished") >= 2  # the second pass only reports them as finished
