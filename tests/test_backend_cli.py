"""``dynsparse train --sparse-backend``: the CSR storage through the command line, on the MNIST MLP."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import write_mnist

from dynsparse.cli.commands import main
from dynsparse.training.checkpoint import read_checkpoint

METHODS = {
    "dsr": ["--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params", "300"],
    "set": ["--rewire", "--rewire-fraction", "0.1"],
    "rigl": ["--rigl", "--update-period", "20"],
}


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root / "MNIST" / "raw", n_train=1000, n_test=100)
    return root


def argv_for(root, runs, method, backend, *extra):
    return ["train", "--model", "mnist_mlp", "--data", str(root), "--runs-dir", str(runs), "--name",
            f"{method}_{backend}",
            "--epochs", "3", "-b", "10", "--initial-sparsity-fc", "0.95", "--no-progress", "--seed", "3",
            "--sparse-backend", backend, *METHODS[method], *extra]


def train(root, runs, method, backend, *extra):
    assert main(argv_for(root, runs, method, backend, *extra)) == 0
    run = runs / f"{method}_{backend}"
    log = run / "reallocations.jsonl"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    return json.loads((run / "summary.json").read_text()), events, run


@pytest.mark.parametrize("method", sorted(METHODS))
def test_csr_backend_through_the_cli_matches_masked(mnist_root, tmp_path, method):
    a, ea, _ = train(mnist_root, tmp_path, method, "masked", "--no-batch-norm")
    b, eb, run = train(mnist_root, tmp_path, method, "csr", "--no-batch-norm")
    assert len(ea) == len(eb) >= 2
    # the same topology changes: counts and per-layer densities after every change
    def changes(events):
        return [(e["pruned"], e["grown"], e["densities"]) for e in events]

    assert changes(ea) == changes(eb)
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["test_top1"] == pytest.approx(rb["test_top1"], abs=1.0)
    assert a["params_total"] == b["params_total"] and a["params_learnable"] == b["params_learnable"]
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert "fc1.weight.values" in ckpt["model"] and "fc1.weight" not in ckpt["model"]
    assert b["config"]["sparse_backend"] == "csr"


def test_resume_on_csr_continues_and_a_changed_backend_is_refused(mnist_root, tmp_path, capsys):
    full, _, _ = train(mnist_root, tmp_path, "dsr", "csr", "--no-batch-norm")
    half = tmp_path / "half"
    half.mkdir()
    train(mnist_root, half, "dsr", "csr", "--no-batch-norm", "--epochs", "2")  # stopped after 2 of 3 epochs
    argv = argv_for(mnist_root, half, "dsr", "csr", "--no-batch-norm", "--resume", str(half / "dsr_csr"))
    assert main(argv) == 0
    resumed = json.loads((half / "dsr_csr" / "summary.json").read_text())
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in full["history"]]
    assert resumed["test_top1"] == full["test_top1"] and resumed["total_pruned"] == full["total_pruned"]
    changed = argv_for(mnist_root, half, "dsr", "masked", "--no-batch-norm", "--resume", str(half / "dsr_csr"),
                       "--epochs", "4")
    assert main(changed) == 2
    assert "sparse-backend" in capsys.readouterr().err


def test_bad_backend_flags_are_refused(mnist_root, tmp_path, capsys):
    base = ["train", "--model", "mnist_mlp", "--data", str(mnist_root), "--runs-dir", str(tmp_path), "--epochs", "1",
            "--no-progress"]
    for extra, message in ((["--sparse-backend", "coo"], "valid choices: auto, csr, masked"),
                           (["--sparse-backend", "csr", "--tied"], "needs --sparse-backend masked"),
                           (["--sparse-backend", "csr", "--initial-sparsity-fc", "0"], "has none")):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


def test_wide_mlp_is_built_in_csr_form_without_a_dense_weight(mnist_root, tmp_path, monkeypatch):
    made = []
    original = torch.nn.Linear.__init__

    def spy(self, in_features, out_features, *a, **k):
        made.append(in_features * out_features)
        original(self, in_features, out_features, *a, **k)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    argv = ["train", "--model", "mnist_mlp", "--hidden-sizes", "30000,30000", "--data", str(mnist_root), "--runs-dir",
            str(tmp_path), "--name", "wide", "--epochs", "1", "-b", "50", "--initial-sparsity-fc", "0.9999",
            "--no-progress", "--sparse-backend", "csr", *METHODS["set"]]
    assert main(argv) == 0
    assert max(made) == 30000 * 10  # only the output layer was ever a dense nn.Linear
    summary = json.loads((tmp_path / "wide" / "summary.json").read_text())
    assert summary["params_sparse_total"] == 784 * 30000 + 30000 * 30000 + 30000 * 10
    ckpt = read_checkpoint(tmp_path / "wide" / "checkpoint.pt")
    assert ckpt["model"]["fc_int.weight.values"].numel() == int(1e-4 * 30000 * 30000 + 0.1)
    assert not any(isinstance(v, torch.Tensor) and v.numel() >= 30000 * 30000 for v in ckpt["model"].values())


def test_dry_run_of_a_wide_csr_mlp_builds_no_dense_hidden_weight(mnist_root, tmp_path, capsys, monkeypatch):
    made = []
    original = torch.nn.Linear.__init__
    monkeypatch.setattr(torch.nn.Linear, "__init__",
                        lambda self, i, o, *a, **k: (made.append(i * o), original(self, i, o, *a, **k))[-1])
    argv = ["train", "--model", "mnist_mlp", "--data", str(mnist_root), "--runs-dir", str(tmp_path), "--hidden-sizes",
            "50000,50000", "--initial-sparsity-fc", "0.999", "--rewire", "--sparse-backend", "csr", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2,500,000,000" in out and out.count(" csr") == 3
    assert max(made) == 50000 * 10  # only the output layer
