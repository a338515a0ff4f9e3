"""Two CPU processes (gloo) under torchrun, through the real command line: identical masks and
weights on both ranks after several reallocations, and the same metrics as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynsparse.training.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[1]


def launch(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "main.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(REPO / "main.py"), *args, "--debug-distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def flags(tiny_mnist: Path, tmp_path: Path, name: str, method: list[str], extra: list[str] = ()) -> list[str]:
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 2\n")
    return ["--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--name", name, "--epochs", "3",
            "-b", "16", "--initial-sparsity-fc", "0.9", "--schedule-file", str(schedule), "--no-progress",
            "--nesterov", "False", *method, *extra]


DSR = ["--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params", "40"]
SET = ["--rewire", "--rewire-fraction", "0.1"]
RIGL = ["--rigl", "--update-period", "1"]  # reads the all-reduced dense gradient
SNFS = ["--sparse-momentum", "--update-period", "1"]  # its own momentum of the all-reduced gradient


@pytest.mark.slow
@pytest.mark.parametrize("method", [DSR, SET, RIGL, SNFS], ids=["dsr", "set", "rigl", "snfs"])
def test_two_ranks_hold_identical_masks_and_weights(method, tiny_mnist, tmp_path):
    proc = launch(2, flags(tiny_mnist, tmp_path, "ddp", method), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    r0 = read_checkpoint(run / "debug_rank0.pt")
    r1 = read_checkpoint(run / "debug_rank1.pt")

    def strip(h):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in h]
    assert strip(r0["history"]) == strip(r1["history"])
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    for k in r0["sparsifier"]["masks"]:
        assert torch.equal(r0["sparsifier"]["masks"][k], r1["sparsifier"]["masks"][k]), k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reallocations"] >= 6 and summary["evidence"]["world_size"] == 2
    assert proc.stdout.count("final test top-1") == 1  # only rank 0 prints


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_data_order(tiny_mnist, tmp_path):
    # no batch norm: two half-batches averaged by DDP give the full batch's gradient
    one = launch(1, flags(tiny_mnist, tmp_path, "single", DSR, ["--no-batch-norm"]), tmp_path)
    two = launch(2, flags(tiny_mnist, tmp_path, "double", DSR, ["--no-batch-norm"]), tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "runs" / "single" / "summary.json").read_text())
    b = json.loads((tmp_path / "runs" / "double" / "summary.json").read_text())
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-3)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)
        assert ra["test_top1"] == pytest.approx(rb["test_top1"], abs=5.0)  # 20 test images: one is 5%
    assert a["params_nonzero"] == b["params_nonzero"]


@pytest.mark.slow
def test_resume_after_a_change_of_world_size(tiny_mnist, tmp_path):
    args = flags(tiny_mnist, tmp_path, "grow", DSR)
    first = launch(1, [*args, "--epochs", "1"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = launch(2, [*args, "--resume", str(tmp_path / "runs" / "grow")], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    s = json.loads((tmp_path / "runs" / "grow" / "summary.json").read_text())
    assert [r["epoch"] for r in s["history"]] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("method", [DSR, RIGL], ids=["dsr", "rigl"])
def test_csr_backend_under_two_ranks_matches_masked(method, tiny_mnist, tmp_path):
    # CSR value vectors change size at every topology change: SparseDataParallel, not DDP
    runs = {}
    for backend in ("masked", "csr"):
        proc = launch(2, flags(tiny_mnist, tmp_path, backend, method, ["--no-batch-norm", "--sparse-backend", backend]),
                      tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[backend] = tmp_path / "runs" / backend
    r0 = read_checkpoint(runs["csr"] / "debug_rank0.pt")
    r1 = read_checkpoint(runs["csr"] / "debug_rank1.pt")
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert "fc1.weight.values" in r0["model"]
    a = json.loads((runs["masked"] / "summary.json").read_text())
    b = json.loads((runs["csr"] / "summary.json").read_text())
    assert b["reallocations"] == a["reallocations"] >= 6
    assert (b["total_pruned"], b["params_nonzero"]) == (a["total_pruned"], a["params_nonzero"])
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["densities"] == rb["densities"]  # per-layer densities after every epoch


@pytest.mark.slow
def test_csr_convs_under_two_ranks_match_masked(tiny_cifar, tmp_path):
    # the WRN's block convs as CSRConv2d (batch-innermost) under SparseDataParallel, per-kernel masks
    # (the default): RigL grows by scores formed from each rank's captured (x, dy) of the convs, which
    # must be the mean over ranks, as the masked dense gradient is (else the ranks' topologies part)
    pytest.importorskip("numba")
    runs = {}
    for backend in ("masked", "csr"):
        proc = launch(2, ["--data", str(tiny_cifar), "--runs-dir", str(tmp_path / "runs"), "--name", backend,
                          "--model", "cifar10_WideResNet", "--layers", "10", "--widen-factor", "1",
                          "--initial-sparsity-conv", "0.7", "-b", "8", "--epochs", "1", "--no-validate-train",
                          "--no-progress", "--seed", "3", *RIGL, "--sparse-backend", backend], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[backend] = tmp_path / "runs" / backend
    r0 = read_checkpoint(runs["csr"] / "debug_rank0.pt")
    r1 = read_checkpoint(runs["csr"] / "debug_rank1.pt")
    assert "block1.layer.0.conv1.weight.values" in r0["model"]
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    a = json.loads((runs["masked"] / "summary.json").read_text())
    b = json.loads((runs["csr"] / "summary.json").read_text())
    assert b["reallocations"] == a["reallocations"] >= 2 and a["total_pruned"] > 0
    assert (b["total_pruned"], b["params_nonzero"]) == (a["total_pruned"], a["params_nonzero"])

    def events(run):
        lines = (run / "reallocations.jsonl").read_text().splitlines()
        return [(e["pruned"], e["grown"], e["densities"]) for e in map(json.loads, lines)]
    assert events(runs["masked"]) == events(runs["csr"])
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], rel=1e-4)
