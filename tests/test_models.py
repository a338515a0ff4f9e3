"""Shapes, exact parameter counts and sparse-weight selection of the reference models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.models import (
    MODEL_NAMES,
    create_model,
    dataset_of,
    layer_type,
    sparse_parameter_names,
)


def _meta(name: str, **kwargs) -> nn.Module:
    # Counting parameters needs shapes only: on the meta device nothing is allocated or initialised.
    with torch.device("meta"):
        return create_model(name, **kwargs)


def _counts(model: nn.Module, **kwargs) -> tuple[int, int]:
    """(total parameters, parameters in sparse tensors)."""
    params = dict(model.named_parameters())
    sparse = sparse_parameter_names(model, **kwargs)
    return sum(p.numel() for p in params.values()), sum(params[n].numel() for n in sparse)


@pytest.fixture(scope="module")
def wrn28_2() -> nn.Module:
    return _meta("cifar10_WideResNet", layers=28, widen_factor=2)


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return _meta("imagenet_resnet50", widen_factor=1, num_classes=1000)


# --- registry ---------------------------------------------------------------------------------

def test_dataset_of():
    assert [dataset_of(n) for n in MODEL_NAMES] == ["mnist", "cifar10", "imagenet"]
    with pytest.raises(DynsparseError, match="model"):
        dataset_of("vgg16")


def test_unknown_model_lists_all_names_sorted():
    with pytest.raises(DynsparseError) as info:
        create_model("resnet18")
    msg = str(info.value)
    assert "'resnet18'" in msg
    assert msg.endswith("cifar10_WideResNet, imagenet_resnet50, mnist_mlp")


@pytest.mark.parametrize("layers", [23, 4, 8, 27])
def test_bad_wrn_depth_raises(layers):
    with pytest.raises(DynsparseError, match=r"\(depth - 4\) % 6"):
        create_model("cifar10_WideResNet", layers=layers, widen_factor=1)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("widen_factor", [0.0, -1.0])
def test_non_positive_widen_factor_raises(name, widen_factor):
    with pytest.raises(DynsparseError, match="widen_factor"):
        create_model(name, widen_factor=widen_factor)


def test_widen_factor_leaving_no_channels_raises():
    with pytest.raises(DynsparseError, match="channel"):
        _meta("cifar10_WideResNet", layers=10, widen_factor=0.01)


# --- LeNet-300-100 ------------------------------------------------------------------------------

def test_mlp_counts_and_forward():
    with_bn = create_model("mnist_mlp")
    assert _counts(with_bn) == (784 * 300 + 300 * 100 + 100 * 10 + 2 * (300 + 100 + 10),
                                784 * 300 + 300 * 100 + 100 * 10)
    assert _counts(with_bn) == (267_020, 266_200)
    assert with_bn.fc1.bias is None and with_bn.bn3.num_features == 10
    assert sparse_parameter_names(with_bn) == ["fc1.weight", "fc_int.weight", "fc2.weight"]

    no_bn = create_model("mnist_mlp", batch_norm=False)
    assert _counts(no_bn) == (266_200 + 300 + 100 + 10, 266_200)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())

    for model in (with_bn, no_bn):
        model.eval()
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_default_init_range():
    w = create_model("mnist_mlp").fc1.weight
    assert w.abs().max() <= 1 / 784 ** 0.5 and w.std() > 0.5 / 784 ** 0.5


# --- Wide ResNet --------------------------------------------------------------------------------

def test_wrn28_2_counts(wrn28_2):
    params = dict(wrn28_2.named_parameters())
    total, n_sparse = _counts(wrn28_2)
    assert (total, n_sparse, total - n_sparse) == (1_467_610, 1_451_520, 16_090)
    dense_conv = sum(p.numel() for n, p in params.items() if n == "conv1.weight" or "Shortcut" in n)
    bn = sum(p.numel() for n, p in params.items() if ".bn" in n or n.startswith("bn"))
    fc = params["fc.weight"].numel() + params["fc.bias"].numel()
    assert (dense_conv, bn, fc) == (11_184, 3_616, 1_290)


def test_wrn28_2_sparse_names(wrn28_2):
    sparse = sparse_parameter_names(wrn28_2)
    assert len(sparse) == 24
    assert sparse[:3] == ["block1.layer.0.conv1.weight", "block1.layer.0.conv2.weight",
                          "block1.layer.1.conv1.weight"]
    assert not {"conv1.weight", "fc.weight"} & set(sparse)
    assert not any("Shortcut" in n for n in sparse)
    assert all(wrn28_2.get_parameter(n).shape[-2:] == (3, 3) for n in sparse)
    assert all(layer_type(wrn28_2, n) == "conv" for n in sparse)
    # The DSR/SET flag concerns ResNet only.
    assert sparse_parameter_names(wrn28_2, sparse_resnet_downsample=True) == sparse


def test_wrn28_2_trainable_params_at_sparsity(wrn28_2):
    params = dict(wrn28_2.named_parameters())
    sizes = [params[n].numel() for n in sparse_parameter_names(wrn28_2)]
    dense = sum(p.numel() for p in params.values()) - sum(sizes)
    # ORIGINAL.md's table is dense + int((1 - s) * all sparse weights), float error included
    # (0.1 * 1,451,520 evaluates to 145,151.99..., hence 161,241 and not 161,242).
    expected = {0.5: 741_850, 0.6: 596_698, 0.7: 451_546, 0.8: 306_393, 0.9: 161_241}
    assert {s: dense + int((1 - s) * sum(sizes)) for s in expected} == expected
    # The reference's SparseTensor keeps int((1 - s) * N + 0.1) entries per tensor, which
    # rounds each of the 24 tensors down: 12 fewer than the table at s = 0.9.
    assert dense + sum(int((1 - 0.9) * n + 0.1) for n in sizes) == 161_229


def test_wrn_thin_dense_width():
    # ORIGINAL.md: "WRN k=0.75 has 209k"; channels round([16, 12, 24, 48]).
    model = _meta("cifar10_WideResNet", layers=28, widen_factor=0.75)
    assert sum(p.numel() for p in model.parameters()) == 209_130
    assert model.fc.in_features == 48


def test_wrn_forward_and_init():
    torch.manual_seed(0)
    model = create_model("cifar10_WideResNet", layers=10, widen_factor=1)
    assert len(sparse_parameter_names(model)) == 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert torch.equal(model.fc.bias, torch.zeros(10))
    conv = model.block3.layer[0].conv2  # 64 -> 64, 3x3: std sqrt(2 / (9 * 64))
    assert abs(conv.weight.std().item() / (2 / (9 * 64)) ** 0.5 - 1) < 0.05
    bn = model.block2.layer[0].bn1
    assert torch.equal(bn.weight, torch.ones(16)) and torch.equal(bn.bias, torch.zeros(16))


def test_wrn_identity_shortcut_when_shapes_match():
    model = _meta("cifar10_WideResNet", layers=16, widen_factor=1)
    block1 = model.block1.layer
    assert block1[0].convShortcut is None and block1[1].convShortcut is None  # 16 -> 16
    assert model.block2.layer[0].convShortcut is not None


def test_wrn_shortcut_sees_preactivated_input():
    model = create_model("cifar10_WideResNet", layers=10, widen_factor=1).eval()
    block = model.block2.layer[0]
    seen = {}
    block.convShortcut.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    block.bn1.register_forward_hook(lambda m, args, out: seen.update(bn=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["x"], torch.relu(seen["bn"]))


# --- ResNet-50 -----------------------------------------------------------------------------------

def test_resnet50_counts(resnet50):
    params = dict(resnet50.named_parameters())
    total, n_sparse = _counts(resnet50)
    assert total == 25_557_032  # torchvision resnet50
    assert params["fc.weight"].numel() == 2_048_000
    assert n_sparse - 2_048_000 == 20_676_608
    assert total - n_sparse == 2_832_424  # "dense part ~2.83M"
    # ORIGINAL.md: 7.38M trainable at s = 0.8 and 5.10M at s = 0.9.
    assert total - n_sparse + int(0.2 * n_sparse) == 7_377_345
    assert total - n_sparse + int(0.1 * n_sparse) == 5_104_884


def test_resnet50_sparse_names(resnet50):
    default = sparse_parameter_names(resnet50)
    assert len(default) == 48 + 1 and default[-1] == "fc.weight"
    assert default[0] == "layer1.0.conv1.weight"
    assert "conv1.weight" not in default and not any("downsample" in n for n in default)
    assert layer_type(resnet50, "fc.weight") == "fc"
    assert layer_type(resnet50, "layer4.2.conv3.weight") == "conv"

    with_ds = sparse_parameter_names(resnet50, sparse_resnet_downsample=True)
    assert len(with_ds) == 52 + 1
    assert set(with_ds) - set(default) == {f"layer{i}.0.downsample.0.weight" for i in range(1, 5)}
    order = [n for n, _ in resnet50.named_parameters()]
    assert with_ds == sorted(with_ds, key=order.index)


@pytest.mark.parametrize("widen_factor, total", [(0.54, 8_167_095), (0.46, 5_771_217)])
def test_resnet50_thin_dense_widths(widen_factor, total):
    # base = round(64 * w), then doubled per stage: 35/70/140/280 and 29/58/116/232.
    model = _meta("imagenet_resnet50", widen_factor=widen_factor, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == total


def test_resnet50_small_forward():
    torch.manual_seed(0)
    model = create_model("imagenet_resnet50", widen_factor=0.25, num_classes=10).eval()
    assert model.conv1.out_channels == 16 and model.fc.in_features == 512
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# --- user models ---------------------------------------------------------------------------------

def test_default_selection_on_user_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10))
    assert sparse_parameter_names(model) == ["0.weight", "4.weight"]
    assert sparse_parameter_names(model, sparse_resnet_downsample=True) == ["0.weight", "4.weight"]
    assert [layer_type(model, n) for n in ("0.weight", "0.bias", "4.weight")] == ["conv", "conv", "fc"]
    with pytest.raises(DynsparseError, match="BatchNorm2d"):
        layer_type(model, "2.weight")
    with pytest.raises(DynsparseError, match="no parameter"):
        layer_type(model, "9.weight")


def test_default_selection_shared_weight_and_bare_linear():
    shared = nn.Linear(3, 3)
    assert sparse_parameter_names(nn.Sequential(shared, nn.Tanh(), shared)) == ["0.weight"]
    assert sparse_parameter_names(nn.Linear(2, 2)) == ["weight"]
    assert layer_type(nn.Linear(2, 2), "weight") == "fc"
