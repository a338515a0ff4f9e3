"""TrainConfig split by concern (issue 24): five parts, each with its own fields and checks, composed
into the flat configuration that the command line builds and ``config.json`` records."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dynsparse.errors import DynsparseError
from dynsparse.training.config import (
    PARTS,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

DATA = Path(__file__).parent / "data"


def test_the_parts_partition_the_fields_and_keep_every_default():
    names = [f.name for kind in PARTS for f in dataclasses.fields(kind)]
    assert len(names) == len(set(names)), "a field in two parts"
    assert names == [f.name for f in dataclasses.fields(TrainConfig)]
    # the defaults before the split (commit 5f21750): every flag's default, every key of config.json
    before = json.loads((DATA / "train_config_defaults.json").read_text())
    assert json.loads(json.dumps(TrainConfig().to_dict())) == before


def test_flat_construction_and_access_and_a_part_alone():
    cfg = TrainConfig(lr=0.05, rewire=True, model="cifar10_WideResNet", hidden_sizes=[300, 100], workers=2)
    assert (cfg.lr, cfg.rewire, cfg.model, cfg.workers) == (0.05, True, "cifar10_WideResNet", 2)
    method = cfg.part(MethodConfig)
    assert isinstance(method, MethodConfig) and method.rewire and not hasattr(method, "lr")
    assert cfg.part(OptimConfig) == OptimConfig(lr=0.05)
    assert cfg.part(ModelConfig) == ModelConfig(model="cifar10_WideResNet")
    assert cfg.part(DataConfig).workers == 2 and cfg.part(RunConfig) == RunConfig()
    assert dataclasses.replace(cfg, lr=0.2).part(OptimConfig).lr == 0.2
    assert TrainConfig(**cfg.to_dict()) == cfg


def test_config_json_of_an_old_run_builds_the_same_config():
    saved = json.loads((DATA / "old_layout_run" / "config.json").read_text())["config"]
    cfg = TrainConfig(**saved)
    assert json.loads(json.dumps(cfg.to_dict())) == saved


@pytest.mark.parametrize("kind,values,message", [
    (ModelConfig, {"model": "cifar10_WideResNet", "hidden_sizes": (10,)}, "--hidden-sizes is for mnist_mlp"),
    (DataConfig, {"batch_size": 0}, "--batch-size must be >= 1"),
    (MethodConfig, {"global_prune": True}, "--global-prune needs --prune"),
    (OptimConfig, {"lr": float("nan")}, "--lr must be a finite number"),
    (RunConfig, {"amp": "fp16"}, "--amp must be off or bf16"),
])
def test_each_part_checks_its_own_fields_alone_and_within_the_whole(kind, values, message):
    with pytest.raises(DynsparseError, match=message):
        kind(**values).validate()
    with pytest.raises(DynsparseError, match=message):
        TrainConfig(**values).validate()
    kind().validate()


def test_checks_across_concerns_stay_with_the_whole():
    with pytest.raises(DynsparseError, match="--image-size"):  # data vs the model's data set
        TrainConfig(image_size=64).validate()
    DataConfig(image_size=64).validate()
    with pytest.raises(DynsparseError, match="--start-epoch"):  # run vs prune mode's number of epochs
        TrainConfig(epochs=5, start_epoch=40, prune=True, start_pruning_after_epoch=1, post_prune_epochs=1).validate()
    TrainConfig(epochs=5, start_epoch=12, prune=True).validate()  # 20 + 0 + 10 epochs in prune mode
    with pytest.raises(DynsparseError, match="--DeepR needs per-weight masks"):  # method vs model
        TrainConfig(model="cifar10_WideResNet", DeepR=True).validate()
