"""CSR convolutions on ResNets behind the engine: torchvision's own ``ResNet`` (basic blocks as in
resnet18/34, bottlenecks as in resnet50-152) and the package's ResNet-50, converted to their
batch-innermost twins by ``Sparsifier(..., backend="csr")``, give the masked network's answers
step by step (the helpers of tests/test_csr_conv_engine.py).

Settings where float32 lets two runs agree (the ResNets are worse conditioned than the WRN):
at 64x64 inputs the last stage is 2x2, so its batch norms see 2*2*batch values (at 32x32 it is
1x1: 4 values at batch 4, and the two backends part within 5 steps); lr 0.01 (at 0.05 these
nets' losses climb and any rounding grows); the package's 16-block ResNet-50 with each block's
last batch norm zero-initialized (``zero_init_residual``: at the default init its gradients grow
50x from fc to the stem and both backends' float32 gradients are 2e-4 off float64 in the first
step, so the runs part at once)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("numba")
pytest.importorskip("torchvision")

from test_csr_conv_engine import assert_same, train
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from dynsparse import Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.models.convnets import ResNet50
from dynsparse.sparse.layers.csr_conv import CSRConv2d
from dynsparse.sparse.layers.csr_linear import CSRLinear, dense_state_dict
from dynsparse.sparse.layers.csr_resnet import resnet_block_convs
from dynsparse.sparse.policies.dsr import DSR
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policies.static import Static
from dynsparse.sparse.when import Periodic


def tv_resnet(block=BasicBlock, width=8, seed=0, **kwargs) -> ResNet:
    """torchvision's ResNet with one block per stage at base width ``width`` (resnet18 and resnet50
    have 64, and 2-2-2-2 / 3-4-6-3 blocks), built by torchvision's own ``_make_layer`` and
    initialized as torchvision does."""
    torch.manual_seed(seed)
    m = ResNet(block, [1, 1, 1, 1], num_classes=5, **kwargs)
    m.conv1, m.bn1, m.inplanes = nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), width
    for i in range(4):
        setattr(m, f"layer{i + 1}", m._make_layer(block, width * 2 ** i, 1, stride=1 if i == 0 else 2))
    m.fc = nn.Linear(width * 8 * block.expansion, 5)
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return m


def resnet50(seed=0) -> ResNet50:
    torch.manual_seed(seed)
    m = ResNet50(widen_factor=0.0625, num_classes=5)  # base width 4
    for name, mod in m.named_modules():
        if name.endswith("bn3"):
            nn.init.zeros_(mod.weight)  # see the module doc
    return m


POLICIES = {
    "static": Static,
    "set": lambda: SET(0.2, when=Periodic(3)),
    "dsr": lambda: DSR(n_prune=30, when=Periodic(3)),
    "dsr-kernels": lambda: DSR(n_prune=30, threshold=0.05, when=Periodic(3)),  # kernel means are larger
    "rigl": lambda: RigL(0.3, when=Periodic(3)),
}


def both(policy, build, *, granularity, names=None, batch=4):
    names = names or resnet_block_convs(build())
    return [train(backend, POLICIES[policy](), granularity=granularity, model=build(), names=names, size=64,
                  batch=batch, lr=0.01) for backend in ("masked", "csr")]


def check_converted(run, names):
    s, m = run[1], run[2]
    assert all(s.params[n].storage == "csr" for n in names)
    assert sorted(n for n, mod in m.named_modules() if isinstance(mod, CSRConv2d)) == sorted(
        n.rpartition(".")[0] for n in names)


@pytest.mark.parametrize("name,granularity", [("static", 4), ("set", 4), ("set", 2), ("dsr", 4),
                                              ("dsr-kernels", 2), ("rigl", 4), ("rigl", 2)])
def test_torchvision_basic_block_resnet_gives_the_masked_answers(name, granularity):
    """resnet18's blocks (two 3x3 convs, the first with the stride) and torchvision's stem."""
    a, b = both(name, tv_resnet, granularity=granularity)
    names = resnet_block_convs(b[2])
    assert len(names) == 8 and names[:2] == ["layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    check_converted(b, names)
    if name != "static":
        assert b[1].totals()["total_pruned"] > 0
    assert_same(a, b)


@pytest.mark.parametrize("name,granularity", [("set", 2), ("rigl", 4)])
def test_torchvision_bottleneck_resnet_every_weight_selected_and_export(name, granularity):
    """resnet50's blocks; every conv and fc selected (the default): the block convs CSR, the stem
    and downsample convs masked (the twin runs them as the same dense modules), fc a CSR linear.
    The export loads (strict) into the plain torchvision network with the same outputs."""
    build = lambda seed=0: tv_resnet(Bottleneck, width=4, seed=seed)  # noqa: E731
    names = [n for n, p in build().named_parameters() if p.dim() > 1]
    a, b = both(name, build, granularity=granularity, names=names, batch=8)
    blocks = resnet_block_convs(b[2])
    assert len(blocks) == 12 and set(blocks) < set(names)
    check_converted(b, blocks)
    storage = {n: sp.storage for n, sp in b[1].params.items()}
    assert storage["conv1.weight"] == storage["layer2.0.downsample.0.weight"] == "masked"
    assert storage["fc.weight"] == "csr" and isinstance(b[2].fc, CSRLinear)
    assert_same(a, b)
    plain = build(seed=5)
    plain.load_state_dict(b[1].export())
    assert sorted(dense_state_dict(b[2])) == sorted(plain.state_dict())
    plain.eval(), b[2].eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b[2](x), plain(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,granularity", [("dsr", 4), ("rigl", 2)])
def test_package_resnet50_gives_the_masked_answers(name, granularity):
    a, b = both(name, resnet50, granularity=granularity, batch=8)
    names = resnet_block_convs(b[2])
    assert len(names) == 48
    check_converted(b, names)
    assert b[1].totals()["total_pruned"] > 0
    assert_same(a, b)


def test_only_torchvisions_own_resnet_converts():
    """A subclass (its forward may do more than the twin's), a block of another class, another
    norm, a ResNeXt's grouped convs: refused by csr in one line, kept masked by auto, nothing
    changed; auto converts torchvision's ResNet below the crossover density."""
    class MyResNet(ResNet):
        def forward(self, x):
            return super().forward(F.dropout(x, 0.5, self.training))

    class MyBlock(BasicBlock):
        pass

    def subclass():
        m = tv_resnet()
        m.__class__ = MyResNet
        return m

    def other_block():
        m = tv_resnet()
        m.layer3[0].__class__ = MyBlock
        return m

    def other_activation():  # the twin's blocks apply ReLU: another activation must not convert
        m = tv_resnet()
        m.layer2[0].relu = nn.SiLU()
        return m

    cases = [(subclass, "is a conv weight of a MyResNet"),
             (other_activation, r"layer2.0 .*nn.ReLU"),
             (other_block, r"layer3.0 \(.*MyBlock\) is not torchvision's BasicBlock or Bottleneck"),
             (lambda: tv_resnet(norm_layer=lambda c: nn.GroupNorm(1, c)), "layer1.0 .*nn.BatchNorm2d norms"),
             (lambda: tv_resnet(Bottleneck, width=4, groups=2),
              "ungrouped convs of stride 1 or 2 with zero padding; layer1.0.conv2.weight.*'auto'")]
    for build, message in cases:
        m = build()
        names = [n for n, p in m.named_parameters() if p.dim() == 4]
        with pytest.raises(DynsparseError, match=message) as e:
            Sparsifier(m, None, policy=Static(), densities=dict.fromkeys(names, 0.1), backend="csr")
        assert "\n" not in str(e.value)
        s = Sparsifier(m, None, policy=Static(), densities=dict.fromkeys(names, 0.1), backend="auto", batch_size=128)
        assert all(sp.storage == "masked" for sp in s.params.values())
        assert not any(isinstance(mod, CSRConv2d) for mod in m.modules())
    m = tv_resnet()
    names = resnet_block_convs(m)
    s = Sparsifier(m, None, policy=Static(), densities=dict.fromkeys(names, 0.1), backend="auto", batch_size=128)
    assert all(s.params[n].storage == "csr" for n in names) and isinstance(m.layer4[0].conv2, CSRConv2d)
    # 0.22: below the crossover of the 3x3 stride-1 convs (0.242), above that of layer2-4's stride-2
    # first convs (0.202): all stay masked
    m = tv_resnet()
    s = Sparsifier(m, None, policy=Static(), densities=dict.fromkeys(names, 0.22), backend="auto", batch_size=128)
    assert all(sp.storage == "masked" for sp in s.params.values()) and isinstance(m.layer4[0].conv2, nn.Conv2d)


def test_a_cifar_stem_runs_as_the_networks_own_modules():
    """The twin calls the stem's modules: torchvision's resnet18 adapted to 32-px images (``conv1``
    a 3x3 stride 1, ``maxpool`` an ``nn.Identity``) converts and computes the plain network's outputs."""
    m = tv_resnet()
    m.conv1, m.maxpool = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.Identity()
    plain = copy.deepcopy(m)
    s = Sparsifier(m, None, policy=Static(), densities=dict.fromkeys(resnet_block_convs(m), 0.3), backend="csr")
    assert isinstance(m.layer1[0].conv1, CSRConv2d)
    plain.load_state_dict(s.export())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(m(x), plain(x), atol=1e-5, rtol=1e-4)  # training mode: batch statistics
