"""``--model torchvision:NAME`` / ``timm:NAME``: built offline with the data's classes, every conv and
linear weight sparse, ImageFolder data, clear errors for unknown names and a missing timm."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.models import create_model, dataset_of, sparse_parameter_names
from dynsparse.training.config import TrainConfig

pytest.importorskip("torchvision")


def test_torchvision_model_builds_offline_with_the_classes_asked_for():
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    names = sparse_parameter_names(model)
    convs_and_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == [f"{n}.weight" for n in convs_and_linears] and len(names) == 21  # 20 convs + fc
    assert "conv1.weight" in names and "fc.weight" in names and "fc.bias" not in names


def test_zoo_models_use_imagefolder_data_and_validate():
    assert dataset_of("torchvision:resnet18") == "imagenet"
    TrainConfig(model="torchvision:mobilenet_v3_small").validate()


def test_unknown_names_are_one_line_errors_with_suggestions():
    with pytest.raises(DynsparseError,
                       match=r"unknown torchvision model 'resnet181'; did you mean torchvision:resnet18") as e:
        dataset_of("torchvision:resnet181")
    assert "classification models, e.g. torchvision:resnet18" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DynsparseError, match="names no model"):
        create_model("torchvision:")
    with pytest.raises(DynsparseError, match="torchvision:NAME"):
        dataset_of("resnet18")
    with pytest.raises(DynsparseError, match="unknown torchvision model"):
        TrainConfig(model="torchvision:fasterrcnn_resnet50_fpn").validate()  # detection, not classification


def test_timm_models_or_a_clear_error_without_timm():
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(DynsparseError, match="needs timm, which is not installed: pip install timm"):
            dataset_of("timm:resnet18")
    else:
        model = create_model("timm:resnet18", num_classes=5).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_one_epoch_run_on_imagefolder_data(tmp_path, monkeypatch):
    from PIL import Image

    from dynsparse.data import imagenet
    from dynsparse.training.run import run_training
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("n01", "n02", "n03"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.JPEG")
    monkeypatch.setattr(imagenet, "CROP_SIZE", 64)
    monkeypatch.setattr(imagenet, "RESIZE_SIZE", 72)
    cfg = dataclasses.replace(
        TrainConfig(), model="torchvision:resnet18", data=str(tmp_path / "data"), epochs=1, batch_size=4, workers=0,
        initial_sparsity_conv=0.9, initial_sparsity_fc=0.5, rewire=True, threshold_prune=True, n_prune_params=50,
        runs_dir=str(tmp_path / "runs"), name="rn18", progress=False, no_validate_train=True)
    cfg.validate()
    summary = run_training(cfg)
    assert summary["model"] == "torchvision:resnet18" and summary["method"] == "dsr" and summary["epochs"] == 1
    densities = summary["history"][-1]["densities"]
    assert "fc.weight" in densities and "conv1.weight" in densities and len(densities) == 21
    assert densities["fc.weight"] == pytest.approx(0.5, abs=0.02)  # --initial-sparsity-fc for the classifier
    assert summary["params_sparse"] < 0.15 * summary["params_sparse_total"]
    assert 0.0 <= summary["test_top1"] <= 100.0
