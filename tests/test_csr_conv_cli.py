"""``dynsparse train --model cifar10_WideResNet --sparse-backend csr``: the WRN's block convs truly
sparse through the command line (tiny synthetic CIFAR-10, WRN-10-1, default per-kernel masks)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("numba")

from dynsparse.cli.commands import main
from dynsparse.training.checkpoint import read_checkpoint

WRN = ["--model", "cifar10_WideResNet", "--layers", "10", "--widen-factor", "1", "--initial-sparsity-conv", "0.7",
       "-b", "8", "--no-progress", "--seed", "3", "--threads", "1"]
RIGL = ["--rigl", "--update-period", "2"]


def dsr(tmp_path):
    schedule = tmp_path / "schedule.yaml"  # a DSR change every 2 of the 5 steps per epoch
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 2\n")
    return ["--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params", "300", "--schedule-file",
            str(schedule), "--sub-kernel-granularity", "4"]


def train(root, runs, name, backend, *extra):
    assert main(["train", "--data", str(root), "--runs-dir", str(runs), "--name", name, *WRN, "--sparse-backend",
                 backend, *extra]) == 0
    run = runs / name
    events = [json.loads(line) for line in (run / "reallocations.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run / "summary.json").read_text()), events, run


def test_wrn_csr_run_resumes_exactly_from_its_checkpoint(tiny_cifar, tmp_path):
    full, events, run = train(tiny_cifar, tmp_path, "csr", "csr", "--epochs", "2", *dsr(tmp_path))
    assert len(events) >= 4 and full["total_pruned"] > 0
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert "block1.layer.0.conv1.weight.values" in ckpt["model"] and "block1.layer.0.conv1.weight" not in ckpt["model"]
    half = tmp_path / "half"
    train(tiny_cifar, half, "csr", "csr", "--epochs", "1", *dsr(tmp_path))  # stopped after 1 of 2 epochs
    assert main(["train", "--data", str(tiny_cifar), "--runs-dir", str(half), "--name", "csr", *WRN, *dsr(tmp_path),
                 "--sparse-backend", "csr", "--epochs", "2", "--resume", str(half / "csr")]) == 0
    resumed = json.loads((half / "csr" / "summary.json").read_text())
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert resumed["total_pruned"] == full["total_pruned"] and resumed["test_top1"] == full["test_top1"]


def test_wrn_csr_through_the_cli_matches_masked(tiny_cifar, tmp_path):
    a, ea, _ = train(tiny_cifar, tmp_path, "masked", "masked", "--epochs", "2", *RIGL)
    b, eb, _ = train(tiny_cifar, tmp_path, "csr", "csr", "--epochs", "2", *RIGL)
    assert len(ea) == len(eb) >= 3  # RigL ends at 75% of the 10 steps
    assert [(e["pruned"], e["grown"], e["densities"]) for e in ea] == [(e["pruned"], e["grown"], e["densities"])
                                                                     for e in eb]
    for ra, rb in zip(a["history"], b["history"]):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
    assert a["params_learnable"] == b["params_learnable"] and a["params_total"] == b["params_total"]


def test_torchvision_resnet18_csr_through_the_cli_matches_masked(tmp_path):
    """``--model torchvision:resnet18 --sparse-backend csr``: its block convs truly sparse (the stem
    and downsample convs masked), the masked run's loss. 64 px, so that the last stage is 2x2: at
    20 px it is 1x1 and its batch norms over a batch of 2 have no gradient but rounding noise."""
    from test_newcomer import image_folder
    root = image_folder(tmp_path / "data")
    argv = ["train", "--model", "torchvision:resnet18", "--data", str(root), "--image-size", "64", "--lr", "0.01",
            "--rewire", "--initial-sparsity-conv", "0.9", "--epochs", "1", "-b", "2", "--no-progress", "-j", "0",
            "--threads", "1", "--seed", "3", "--runs-dir", str(tmp_path / "runs")]
    runs = {}
    for backend in ("masked", "csr"):
        assert main([*argv, "--name", backend, "--sparse-backend", backend]) == 0
        runs[backend] = json.loads((tmp_path / "runs" / backend / "summary.json").read_text())
    ckpt = read_checkpoint(tmp_path / "runs" / "csr" / "checkpoint.pt")
    assert "layer4.1.conv2.weight.values" in ckpt["model"] and "conv1.weight" in ckpt["model"]
    assert "layer2.0.downsample.0.weight" in ckpt["model"]  # the shortcut convs stay masked (dense tensors)
    a, b = runs["masked"], runs["csr"]
    assert b["history"][0]["train_loss"] == pytest.approx(a["history"][0]["train_loss"], rel=1e-5)
    assert a["params_learnable"] == b["params_learnable"] < 0.2 * a["params_total"]
