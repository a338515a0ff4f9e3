"""The training harness end to end on tiny synthetic MNIST: outputs, exact resume, bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynsparse.cli.commands import main, parse_train_args
from dynsparse.errors import DynsparseError
from dynsparse.training.checkpoint import read_checkpoint
from dynsparse.training.run import run_training

REPO = Path(__file__).resolve().parents[1]


def cfg_for(tiny_mnist: Path, runs: Path, *extra: str):
    argv = ["--model", "mnist_mlp", "--data", str(tiny_mnist), "--runs-dir", str(runs), "--batch-size", "16",
            "--epochs", "2", "--no-progress", *extra]
    if "--schedule-file" in extra:  # a rewire period of 3 steps, so tiny runs reallocate
        schedule = tiny_mnist / "schedule.yaml"
        schedule.write_text("lr_schedule:\n  - 0 : 0.1\n  - 1 : 0.05\nrewire_period_schedule:\n  - 0 : 3\n")
        argv[argv.index("TINY_SCHEDULE")] = str(schedule)
    return parse_train_args(argv)[0]


DSR_FLAGS = ("--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune", "--rewire-scaling",
             "--n-prune-params", "50", "--schedule-file", "TINY_SCHEDULE")


def test_outputs_summary_and_metrics(tiny_mnist, tmp_path):
    summary = run_training(cfg_for(tiny_mnist, tmp_path, *DSR_FLAGS))
    run = tmp_path / "mnist_mlp_0"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "initial.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes leave no temporaries
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["test_top1"] == summary["test_top1"] == summary["history"][-1]["test_top1"]
    for key in ("best_test_top1", "params_total", "params_nonzero", "history", "evidence"):
        assert key in on_disk
    assert on_disk["params_total"] == 267_020
    # 10% of 266,200 sparse weights kept (per tensor int(0.1 n + 0.1)) plus 820 BN parameters
    assert on_disk["params_learnable"] == 23_520 + 3_000 + 100 + 820
    # DSR regrows at zero: entries grown by the last reallocations may still be exactly zero
    assert 0 < on_disk["params_learnable"] - on_disk["params_nonzero"] <= summary["total_grown"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [0, 1]
    assert json.loads((run / "config.json").read_text())["method"] == "dsr"
    ev = on_disk["evidence"]
    assert {"command", "commit", "uncommitted", "device", "versions"} <= set(ev)
    if ev["commit"] is not None:  # a git checkout: the list of modified tracked files (maybe empty)
        assert len(ev["commit"]) == 40 and isinstance(ev["uncommitted"], list)


def test_resume_is_exact(tiny_mnist, tmp_path):
    straight = run_training(cfg_for(tiny_mnist, tmp_path / "a", *DSR_FLAGS))
    run_training(cfg_for(tiny_mnist, tmp_path / "b", *DSR_FLAGS, "--epochs", "1"))
    resumed = run_training(cfg_for(tiny_mnist, tmp_path / "b", *DSR_FLAGS, "--resume",
                                   str(tmp_path / "b" / "mnist_mlp_0")))
    a = read_checkpoint(tmp_path / "a" / "mnist_mlp_0" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "b" / "mnist_mlp_0" / "checkpoint.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["sparsifier"]["masks"].items():
        assert torch.equal(v, b["sparsifier"]["masks"][k]), k
    assert a["sparsifier"]["policy"]["threshold"] == b["sparsifier"]["policy"]["threshold"]
    assert [r["test_loss"] for r in straight["history"]] == [r["test_loss"] for r in resumed["history"]]
    assert a["events"] == b["events"] and len(a["events"]) > 0


def test_existing_run_is_not_overwritten_silently(tiny_mnist, tmp_path):
    run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1"))
    with pytest.raises(DynsparseError, match="already holds a run"):
        run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1"))
    run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1", "--overwrite"))


def test_resume_from_another_run_takes_its_weights(tiny_mnist, tmp_path):
    run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1", "--initial-sparsity-fc", "0"))
    src = read_checkpoint(tmp_path / "mnist_mlp_0" / "checkpoint.pt")
    s = run_training(cfg_for(tiny_mnist, tmp_path, "--epochs", "1", "--initial-sparsity-fc", "0", "--job-idx", "1",
                             "--resume", str(tmp_path / "mnist_mlp_0"), "--lr", "0", "--momentum", "0",
                             "--nesterov", "False", "--weight-decay", "0"))
    dst = read_checkpoint(tmp_path / "mnist_mlp_1" / "checkpoint.pt")
    assert torch.equal(src["model"]["fc1.weight"], dst["model"]["fc1.weight"])  # lr 0: weights unchanged
    assert s["epochs"] == 1


def test_bad_inputs_give_one_line_errors(tiny_mnist, tmp_path, capsys):
    bad_schedule = tmp_path / "bad.yaml"
    bad_schedule.write_text("lr_schedule: [")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    cases = [
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--data", str(tmp_path / "nowhere")], "train-images-idx3-ubyte"),
        (["--schedule-file", str(bad_schedule)], "not valid YAML"),
        (["--resume", str(tmp_path / "missing")], "not found"),
        (["--resume", str(corrupt)], "corrupt or unreadable"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--budget", "lottery"], "unknown budget 'lottery'"),
        (["--dense-layers", "conv*"], "matches no sparse layer"),
    ]
    for extra, needle in cases:
        argv = ["train", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1",
                "--no-progress", *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("dynsparse: error: ") and needle in err, (extra, err)
        assert err.count("\n") == 1


def test_cli_subprocess_trains_and_prints_a_table(tiny_mnist, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--data", str(tiny_mnist), "--runs-dir",
                           str(tmp_path), "--epochs", "2", "-b", "32", "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert len(rows) == 2 and "final test top-1" in proc.stdout


def test_bf16_autocast_and_channels_last_train(tiny_cifar, tmp_path):
    cfg, _ = parse_train_args(["--model", "cifar10_WideResNet", "--layers", "10", "--widen-factor", "1",
                               "--data", str(tiny_cifar), "--runs-dir", str(tmp_path), "--epochs", "1", "-b", "8",
                               "--initial-sparsity-conv", "0.8", "--rewire", "--threshold-prune", "--rewire-scaling",
                               "--amp", "bf16", "--channels-last", "--no-progress"])
    s = run_training(cfg)
    assert s["config"]["amp"] == "bf16" and s["params_sparse"] < s["params_sparse_total"]
    ckpt = read_checkpoint(tmp_path / cfg.run_name / "checkpoint.pt")
    conv = ckpt["model"]["block1.layer.0.conv1.weight"]
    mask = ckpt["sparsifier"]["masks"]["block1.layer.0.conv1.weight"]
    off = ~mask.bool().reshape(mask.shape + (1,) * (conv.dim() - mask.dim())).expand_as(conv)
    assert off.any() and bool((conv[off] == 0).all())  # bf16 steps keep the weights on their masks
    with pytest.raises(DynsparseError, match="--amp must be off or bf16"):
        parse_train_args(["--amp", "fp8"])
