"""CSR convolutions on the batch-innermost layout: same answers as the masked dense network."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("numba")

from dynsparse.errors import DynsparseError
from dynsparse.models.convnets import WideResNet
from dynsparse.sparse.kernels.cbhw import batch_norm_relu_cbhw
from dynsparse.sparse.kernels.conv import from_cbhw, to_cbhw
from dynsparse.sparse.layers.csr_conv import (
    CSRConv2d,
    CSRWideResNet,
    batch_norm_cbhw,
    conv1x1_cbhw,
    csr_conv_from_conv,
)


def _wrn_and_masks(density=0.3, seed=0):
    torch.manual_seed(seed)
    wrn = WideResNet(depth=10, widen_factor=1, num_classes=5)
    g = torch.Generator().manual_seed(seed + 1)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in wrn.named_parameters()
             if n in wrn.sparse_parameter_names()}
    with torch.no_grad():
        for n, p in wrn.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return wrn, masks


def _masked_step(model, masks, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    for n, m in masks.items():
        params[n].grad.mul_(m)
    opt.step()
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    return loss.item()


def _csr_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _exported(csr: CSRWideResNet) -> dict[str, torch.Tensor]:
    out = {}
    for i, b in enumerate(csr.blocks):
        out[i] = [b["conv1"].to_dense(), b["conv2"].to_dense()]
    return out


def test_wrn_trains_like_the_masked_network_through_a_topology_change():
    wrn, masks = _wrn_and_masks()
    masked = copy.deepcopy(wrn)
    csr = CSRWideResNet(copy.deepcopy(wrn), masks)
    # memory proportional to the nonzeros: no dense block conv weight is kept
    dense_block = sum(p.numel() for n, p in wrn.named_parameters() if n in masks)
    nnz = sum(int(m.sum()) for m in masks.values())
    assert sum(p.numel() for p in csr.parameters()) == sum(p.numel() for p in wrn.parameters()) - dense_block + nnz
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_c = torch.optim.SGD(csr.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(4)]
    for step, (x, y) in enumerate(batches):
        if step == 2:  # a DSR-like change: drop the smallest half of one layer, regrow as many at random
            name, conv = "block2.layer.0.conv1.weight", csr.blocks[1]["conv1"]
            w = conv.weight
            keep = torch.ones(w.num_active, dtype=torch.bool)
            keep[w.values.detach().abs().argsort()[: w.num_active // 2]] = False
            free = (~masks[name].reshape(-1)).nonzero().squeeze(1)
            add = free[torch.randperm(free.numel(), generator=g)[: int((~keep).sum())]]
            w.set_topology(keep, add, optimizer=opt_c)
            new_mask = torch.zeros(masks[name].numel(), dtype=torch.bool)
            new_mask[w.active_flat()] = True
            masks[name] = new_mask.view_as(masks[name])
            p = dict(masked.named_parameters())[name]
            with torch.no_grad():
                p.mul_(masks[name])  # new entries start at zero, dropped ones are zeroed
                opt_m.state[p]["momentum_buffer"].mul_(masks[name])
        lm = _masked_step(masked, masks, opt_m, x, y)
        lc = _csr_step(csr, opt_c, x, y)
        assert lc == pytest.approx(lm, rel=1e-5, abs=1e-6), step
    params = dict(masked.named_parameters())
    for i, (gname, j) in enumerate([("block1", 0), ("block2", 0), ("block3", 0)]):
        for k, conv in enumerate(("conv1", "conv2")):
            torch.testing.assert_close(_exported(csr)[i][k], params[f"{gname}.layer.{j}.{conv}.weight"].detach(),
                                       atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(csr.fc.weight, masked.fc.weight, atol=1e-5, rtol=1e-4)


def test_eval_mode_and_batch_norm_running_stats_match():
    wrn, masks = _wrn_and_masks(density=0.5, seed=2)
    masked, csr = copy.deepcopy(wrn), CSRWideResNet(copy.deepcopy(wrn), masks)
    x = torch.randn(5, 3, 8, 8)
    masked(x), csr(x)  # training forwards update the running statistics
    ref_bn, bn = masked.block2.layer[0].bn2, csr.blocks[1]["bn2"]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
    masked.eval(), csr.eval()
    with torch.no_grad():
        torch.testing.assert_close(csr(x), masked(x), atol=1e-5, rtol=1e-4)


def test_batch_norm_and_shortcut_on_the_layout():
    bn = nn.BatchNorm2d(4, momentum=None)
    ref = copy.deepcopy(bn)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(from_cbhw(batch_norm_cbhw(bn, to_cbhw(x))), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    w = torch.randn(6, 4, 1, 1)
    for stride in (1, 2):
        torch.testing.assert_close(from_cbhw(conv1x1_cbhw(w, to_cbhw(x), stride)), F.conv2d(x, w, stride=stride),
                                   atol=1e-5, rtol=1e-5)


def test_conv_layer_checkpoint_and_pattern_cache():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    layer = csr_conv_from_conv(conv, mask)
    x = torch.randn(3, 6, 6, 2)
    torch.testing.assert_close(from_cbhw(layer(x)), F.conv2d(from_cbhw(x), conv.weight * mask, padding=1),
                               atol=1e-5, rtol=1e-5)
    # a checkpoint with another count loads into a fresh layer, and its products follow the new pattern
    other = csr_conv_from_conv(conv, torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.7)
    other(x)  # builds its transposed index for the old pattern
    other.load_state_dict(layer.state_dict())
    assert other.weight.num_active == layer.weight.num_active
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(DynsparseError, match="stride"):
        CSRConv2d(layer.weight, 3, 3, stride=3)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_batch_norm_relu_matches_unfused(momentum):
    bn = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = copy.deepcopy(bn)
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    xc = to_cbhw(x).requires_grad_()
    xr = x.clone().requires_grad_()
    for _ in range(2):  # twice: the running statistics' update and num_batches_tracked
        y = batch_norm_relu_cbhw(bn, xc)
        y_ref = F.relu(ref(xr))
    torch.testing.assert_close(from_cbhw(y), y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y_ref)
    y.backward(to_cbhw(dy))
    y_ref.backward(dy)
    torch.testing.assert_close(from_cbhw(xc.grad), xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    bn.eval(), ref.eval()  # evaluation: the running statistics (unfused path)
    torch.testing.assert_close(from_cbhw(batch_norm_relu_cbhw(bn, to_cbhw(x))), F.relu(ref(x)), atol=1e-5, rtol=1e-5)
