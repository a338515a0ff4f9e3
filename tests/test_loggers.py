"""Scalar loggers: csv and TensorBoard output read back (TensorBoard's own event reader), wandb
offline when installed, and clear errors for unknown names and missing extras."""
from __future__ import annotations

import csv
import sys

import pytest

from dynsparse.errors import DynsparseError
from dynsparse.training.loggers import CSVLogger, create_logger, epoch_scalars, flatten

# an epoch row as run._train_loop builds it for a DSR run with a validation split
ROW = {"epoch": 3, "lr": 0.1, "train_loss": 0.5, "train_top1_running": 85.0, "val_loss": 0.4, "val_top1": 88.0,
       "val_top5": 99.0, "test_loss": 0.45, "test_top1": 87.5, "test_top5": 99.1, "params_total": 267020,
       "params_nonzero": 6144, "rewires": 12, "pruned": 6157, "threshold": 0.032,
       "densities": {"fc1.weight": 0.019, "fc_int.weight": 0.024, "fc2.weight": 0.065}, "time_s": 4.8}


def test_epoch_scalars_cover_losses_accuracies_lr_densities_threshold_and_reallocations():
    flat = flatten(epoch_scalars(ROW))
    assert flat == {"lr": 0.1, "loss/train": 0.5, "top1/train_running": 85.0, "loss/val": 0.4, "top1/val": 88.0,
                    "top5/val": 99.0, "loss/test": 0.45, "top1/test": 87.5, "top5/test": 99.1,
                    "params/nonzero": 6144.0, "reallocation/updates": 12.0, "reallocation/moved": 6157.0,
                    "dsr/threshold": 0.032, "density/fc1.weight": 0.019, "density/fc_int.weight": 0.024,
                    "density/fc2.weight": 0.065, "time/epoch_s": 4.8}
    assert "dsr/threshold" not in flatten(epoch_scalars({**ROW, "threshold": None}))  # SET/RigL have none


def test_csv_logger_reads_back_and_a_resumed_run_keeps_earlier_rows(tmp_path):
    logger = create_logger("csv", tmp_path)
    for step in range(3):
        logger.log_dict(epoch_scalars({**ROW, "epoch": step, "test_top1": 80.0 + step}), step=step)
    logger.close()
    rows = list(csv.DictReader((tmp_path / "scalars.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert [float(r["top1/test"]) for r in rows] == [80.0, 81.0, 82.0]
    assert float(rows[0]["density/fc2.weight"]) == 0.065 and float(rows[0]["dsr/threshold"]) == 0.032
    resumed = CSVLogger(tmp_path, start_step=2)  # epoch 2 is trained again after a resume
    resumed.log_dict({"top1/test": 90.0}, step=2)
    rows = list(csv.DictReader((tmp_path / "scalars.csv").open()))
    assert [(r["step"], r["top1/test"]) for r in rows] == [("0", "80.0"), ("1", "81.0"), ("2", "90.0")]
    CSVLogger(tmp_path).log_dict({"lr": 0.1}, step=0)  # a new run starts the file again
    assert len(list(csv.DictReader((tmp_path / "scalars.csv").open()))) == 1


def test_tensorboard_logger_is_read_back_by_tensorboards_event_reader(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logger = create_logger(["tensorboard", "csv"], tmp_path)
    for step in range(3):
        logger.log_dict(epoch_scalars({**ROW, "test_top1": 80.0 + step, "rewires": step}), step=step)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr", "loss/train", "loss/test", "top1/test", "top1/val", "density/fc1.weight",
            "dsr/threshold", "reallocation/updates", "reallocation/moved"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("top1/test")] == [(0, 80.0), (1, 81.0), (2, 82.0)]
    assert [e.value for e in acc.Scalars("reallocation/updates")] == [0.0, 1.0, 2.0]
    assert acc.Scalars("density/fc2.weight")[0].value == pytest.approx(0.065)
    assert (tmp_path / "scalars.csv").is_file()


def test_wandb_logger_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = create_logger("wandb", tmp_path, config={"model": "mnist_mlp"})
    logger.log_dict(epoch_scalars(ROW), step=0)
    logger.close()
    assert (tmp_path / "wandb_id").is_file() and list((tmp_path / "wandb").glob("offline-run-*"))


def test_unknown_logger_and_missing_extra_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DynsparseError, match=r"unknown logger 'tensorbord'; valid choices: csv, tensorboard, wandb"):
        create_logger("csv,tensorbord", tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(DynsparseError, match=r"pip install 'dynsparse\[wandb\]'"):
        create_logger("wandb", tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(DynsparseError, match=r"pip install 'dynsparse\[tensorboard\]'"):
        create_logger("tensorboard", tmp_path)
    assert create_logger("", tmp_path).log_dict({"x": 1.0}, 0) is None  # no logger: nothing written
    assert not (tmp_path / "scalars.csv").exists()


def test_train_with_logger_writes_scalars_per_epoch(tiny_mnist, tmp_path):
    """`dynsparse train --logger csv,tensorboard`, read back with TensorBoard's own reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dynsparse.cli.commands import main
    argv = ["train", "--data", str(tiny_mnist), "--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune",
            "--rewire-scaling", "--epochs", "2", "-b", "32", "--runs-dir", str(tmp_path), "--name", "r",
            "--logger", "csv,tensorboard", "--no-progress"]
    assert main(argv) == 0
    rows = list(csv.DictReader((tmp_path / "r" / "scalars.csv").open()))
    assert [r["step"] for r in rows] == ["0", "1"] and "density/fc1.weight" in rows[0] and "dsr/threshold" in rows[0]
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("top1/test")] == [0, 1]
