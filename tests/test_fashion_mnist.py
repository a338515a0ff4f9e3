"""Fashion-MNIST for the MNIST models: the loader in both layouts, its errors, ``--dataset`` on
the command line (refused for other models, saved, checked on resume, named in reports), and one
real-data test that reads the set from ``DYNSPARSE_FASHION_DATA``."""
from __future__ import annotations

import csv
import json
import os
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import dynsparse.data as data_module
from dynsparse.cli.commands import main
from dynsparse.data import datasets
from dynsparse.errors import DynsparseError
from dynsparse.training.checkpoint import RESUME_MAY_CHANGE
from dynsparse.training.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from conftest import mnist_arrays, write_mnist  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no network in tests")
    monkeypatch.setattr(datasets, "_fetch", offline)


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dynsparse: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("layout, gz", [("torchvision", True), ("torchvision", False), ("flat", True),
                                        ("flat", False)])
def test_loader_reads_both_layouts_gzipped_or_not(tmp_path, layout, gz):
    root = tmp_path / "data"
    write_mnist(root / "FashionMNIST" / "raw" if layout == "torchvision" else root, n_train=23, n_test=7, gz=gz)
    train_x, train_y, test_x, test_y = datasets.load_fashion_mnist(root, download=False)
    images, labels = mnist_arrays(23)
    assert train_x.dtype == torch.uint8 and train_x.shape == (23, 1, 28, 28) and test_x.shape == (7, 1, 28, 28)
    assert train_y.dtype == torch.int64 and torch.equal(train_y, torch.from_numpy(labels.astype(np.int64)))
    assert np.array_equal(train_x[:, 0].numpy(), images)
    assert test_x[:, 0, 0, 0].tolist() == list(range(100, 107))  # the test files, not the training ones


def test_fashion_and_mnist_are_not_confused(tmp_path):
    """A root holding only MNIST/raw has no Fashion-MNIST; one holding both reads each from its folder."""
    root = tmp_path / "data"
    write_mnist(root / "MNIST" / "raw", n_train=12, n_test=5)
    with pytest.raises(DynsparseError, match="Fashion-MNIST not found"):
        datasets.load_fashion_mnist(root, download=False)
    write_mnist(root / "FashionMNIST" / "raw", n_train=21, n_test=5)
    assert len(datasets.load_fashion_mnist(root, download=False)[1]) == 21
    assert len(datasets.load_mnist(root, download=False)[1]) == 12


def test_missing_files_give_a_clear_error(tmp_path):
    root = tmp_path / "data"
    write_mnist(root / "FashionMNIST" / "raw", n_train=5, n_test=5)
    (root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DynsparseError) as e:
        datasets.load_fashion_mnist(root, download=False)
    msg = str(e.value)
    assert "Fashion-MNIST not found: missing t10k-labels-idx1-ubyte[.gz] in" in msg
    assert str((root / "FashionMNIST" / "raw").absolute()) in msg and "downloading is off" in msg
    assert "--data DIR" in msg and "\n" not in msg
    with pytest.raises(DynsparseError) as e:  # offline download: names Zalando's URL, leaves no folders
        datasets.load_fashion_mnist(tmp_path / "empty")
    assert f"download from {datasets.FASHION_MNIST_URL} failed" in str(e.value)
    assert "train-images-idx3-ubyte[.gz]" in str(e.value) and not (tmp_path / "empty").exists()


def test_download_checks_zalandos_md5s(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, dest):
        fetched.append(url)
        Path(dest).write_bytes(b"not the file")
    monkeypatch.setattr(datasets, "_fetch", fake_fetch)
    with pytest.raises(DynsparseError, match="checksum mismatch .* expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        datasets.load_fashion_mnist(tmp_path)
    assert fetched == [datasets.FASHION_MNIST_URL + "train-images-idx3-ubyte.gz"]


def test_build_data_uses_fashion_normalization(tmp_path):
    root = tmp_path / "data"
    write_mnist(root / "FashionMNIST" / "raw", n_train=30, n_test=10)
    bundle = data_module.build_data("fashion_mnist", root, batch_size=30, device=torch.device("cpu"))
    x, _ = next(iter(bundle.test))
    mean, std = data_module.FASHION_MNIST_MEAN[0], data_module.FASHION_MNIST_STD[0]
    assert x[0, 0, 27, 27].item() == pytest.approx((1 - mean) / std, rel=1e-6)  # pixel 255
    assert bundle.num_train == 30 and bundle.num_classes == 10
    with pytest.raises(DynsparseError, match="holds out the last 10000"):  # the MNIST holdout
        data_module.build_data("fashion_mnist", root, batch_size=30, device=torch.device("cpu"), validate_set=True)


def test_config_dataset_choice_name_and_normalization():
    assert TrainConfig().run_name == "mnist_mlp_0" and TrainConfig().dataset_name == "mnist"
    fashion = TrainConfig(dataset="fashion_mnist", job_idx=3)
    fashion.validate()
    assert fashion.run_name == "mnist_mlp_fashion_mnist_3" and fashion.dataset_name == "fashion_mnist"
    assert TrainConfig(dataset="fashion_mnist", name="x").run_name == "x"
    own = TrainConfig(dataset="mnist")  # the model's own data set is the default: same run, same config
    assert own.dataset == "" and own.run_name == "mnist_mlp_0" and own.to_dict() == TrainConfig().to_dict()
    TrainConfig(model="cifar10_WideResNet", dataset="cifar10").validate()
    with pytest.raises(DynsparseError, match="valid choices: mnist, fashion_mnist"):
        TrainConfig(dataset="fashion").validate()


def test_dataset_refused_for_a_model_that_does_not_read_mnist(capsys):
    code, _, err = run_main(capsys, ["train", "--model", "cifar10_WideResNet", "--dataset", "fashion_mnist",
                                     "--dry-run"])
    one_line_error(code, err, "--dataset fashion_mnist is not available for cifar10_WideResNet",
                   "valid choices: cifar10", "mnist_mlp")


def test_help_shows_dataset_in_the_data_section(capsys):
    code, out, _ = run_main(capsys, ["train", "--help"])
    data_section = out.split("\ndata:\n", 1)[1].split("\n\n", 1)[0]
    assert code == 0 and "--dataset {mnist,fashion_mnist}" in data_section and "FashionMNIST/raw" in data_section


def test_dry_run_names_fashion_mnist(tmp_path, capsys):
    root = tmp_path / "data"
    write_mnist(root, n_train=5, n_test=5)  # flat layout
    code, out, _ = run_main(capsys, ["train", "--dataset", "fashion_mnist", "--data", str(root), "--dry-run",
                                     "--runs-dir", str(tmp_path / "runs")])
    assert code == 0 and f"fashion_mnist in {root}: found" in out and "mnist_mlp_fashion_mnist_0 (new)" in out


def test_cli_trains_resumes_and_reports_on_fashion_mnist(tmp_path, capsys):
    root, runs = tmp_path / "data", tmp_path / "runs"
    write_mnist(root / "FashionMNIST" / "raw", n_train=200, n_test=100)
    write_mnist(root / "MNIST" / "raw", n_train=50, n_test=10)  # a root with both, as a study's
    common = ["train", "--data", str(root), "--runs-dir", str(runs), "--name", "f", "-b", "50", "--no-progress",
              "--no-validate-train", "--initial-sparsity-fc", "0.98", "--rewire", "--threshold-prune",
              "--rewire-scaling", "--device", "cpu"]
    code, _, err = run_main(capsys, [*common, "--dataset", "fashion_mnist", "--epochs", "1"])
    assert code == 0, err
    config = json.loads((runs / "f" / "config.json").read_text())
    assert config["config"]["dataset"] == "fashion_mnist" and "dataset" not in RESUME_MAY_CHANGE
    summary = json.loads((runs / "f" / "summary.json").read_text())
    assert 0.0 <= summary["test_top1"] <= 100.0 and len(summary["history"]) == 1

    # without --dataset the run would train on MNIST: refused, nothing changed
    code, _, err = run_main(capsys, [*common, "--resume", str(runs / "f"), "--epochs", "2"])
    one_line_error(code, err, "--dataset 'fashion_mnist' -> ''")
    assert len(json.loads((runs / "f" / "summary.json").read_text())["history"]) == 1
    code, _, err = run_main(capsys, [*common, "--dataset", "fashion_mnist", "--resume", str(runs / "f"),
                                     "--epochs", "2"])
    assert code == 0, err
    assert len(json.loads((runs / "f" / "summary.json").read_text())["history"]) == 2

    # a report labels the data set and never puts MNIST's published number (98.14 for DSR at 0.98) beside it
    code, _, err = run_main(capsys, ["report", str(runs), "--out", str(tmp_path / "report")])
    assert code == 0, err
    with open(tmp_path / "report" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["dataset"] == "fashion_mnist" and row["method"] == "dsr (fashion_mnist)"
    assert row["published_top1"] == "" and row["published_source"] == ""
    md = (tmp_path / "report" / "report.md").read_text()
    assert "dsr (fashion_mnist)" in md and "98.14" not in md and "SL-MNIST" not in md


@pytest.mark.slow
def test_real_fashion_mnist():
    """Reads the real set from $DYNSPARSE_FASHION_DATA (e.g. /usr/share/datasets/fashion-mnist from
    Debian's dataset-fashion-mnist, or a root holding FashionMNIST/raw)."""
    root = os.environ.get("DYNSPARSE_FASHION_DATA")
    if not root:
        pytest.skip("set DYNSPARSE_FASHION_DATA to a root holding Fashion-MNIST")
    train_x, train_y, test_x, test_y = datasets.load_fashion_mnist(Path(root), download=False)
    assert train_x.shape == (60_000, 1, 28, 28) and test_x.shape == (10_000, 1, 28, 28)
    assert train_y.bincount().tolist() == [6000] * 10 and test_y.bincount().tolist() == [1000] * 10
    pixels = train_x.double() / 255  # the constants in dynsparse.data come from exactly this
    assert pixels.mean().item() == pytest.approx(data_module.FASHION_MNIST_MEAN[0], abs=5e-5)
    assert pixels.std().item() == pytest.approx(data_module.FASHION_MNIST_STD[0], abs=5e-5)
