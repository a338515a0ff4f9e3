"""A checkpoint written before the package was split by concern (issue 24 item 4) still loads and resumes.

tests/data/old_layout_run/ holds ``checkpoint.pt`` and ``config.json`` of a 1-epoch ``mnist_mlp`` run at fc
sparsity 0.9 on the tiny synthetic MNIST of conftest.py, written by commit 2e3538b (the flat layout:
``dynsparse/run.py``, ``dynsparse/checkpoint.py``, ...). Checkpoints are read with ``weights_only=True``, so they
hold no module paths; this test keeps it that way.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dynsparse.cli.commands import parse_train_args
from dynsparse.training.checkpoint import read_checkpoint
from dynsparse.training.run import run_training

OLD = Path(__file__).parent / "data" / "old_layout_run"


def test_a_checkpoint_of_the_flat_layout_loads(tmp_path):
    ckpt = read_checkpoint(OLD / "checkpoint.pt")
    assert ckpt["model"]["fc1.weight"].shape == (300, 784)
    masks = ckpt["sparsifier"]["masks"]
    assert 0.05 < masks["fc1.weight"].float().mean().item() < 0.15  # ~10% of fc1 kept


def test_a_run_resumes_from_a_checkpoint_of_the_flat_layout(tiny_mnist, tmp_path):
    src = tmp_path / "runs" / "old"
    shutil.copytree(OLD, src)
    argv = ["--model", "mnist_mlp", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"),
            "--batch-size", "16", "--epochs", "1", "--no-progress", "--initial-sparsity-fc", "0.9",
            "--job-idx", "1", "--resume", str(src), "--lr", "0", "--momentum", "0", "--nesterov", "False",
            "--weight-decay", "0"]
    run_training(parse_train_args(argv)[0])
    before = read_checkpoint(src / "checkpoint.pt")
    after = read_checkpoint(tmp_path / "runs" / "mnist_mlp_1" / "checkpoint.pt")
    # lr 0: the old run's trained weights came through unchanged
    assert torch.equal(before["model"]["fc1.weight"], after["model"]["fc1.weight"])
