"""One default selection rule for the library and the command line (issue 24).

The CLI's built-in models keep the paper's own list of sparse layers (pinned here name by name, as
before the rule was merged); every other model, in the library or through ``--model
torchvision:``/``timm:``, gets ``select_weights``: every weight used as a matrix product,
attention's ``in_proj_weight``, conv-transpose and bilinear weights included."""
from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from dynsparse import SET, Periodic, Sparsifier
from dynsparse.models import create_model, layer_type, sparse_parameter_names
from dynsparse.sparse.select import select_weights
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import densities

# (model, options, --sparse-resnet-downsample) -> count and sha256 of the names, one per line, in
# order: what each model selected before the rules were merged (commit 5f21750).
PINNED = [
    ("mnist_mlp", {}, False, 3, "ecf7a470a2b53336"),
    ("mnist_mlp", {"hidden_sizes": (20, 10, 5)}, False, 4, "3a85af0ed6376b4e"),
    ("mnist_mlp", {"batch_norm": False}, True, 3, "ecf7a470a2b53336"),
    ("cifar10_WideResNet", {"layers": 16, "widen_factor": 1}, False, 12, "3c3ab06e3d3c2adc"),
    ("cifar10_WideResNet", {"layers": 28, "widen_factor": 2}, True, 24, "6ae03de154c39f19"),
    ("imagenet_resnet50", {"widen_factor": 0.25}, False, 49, "a6091e6d05b92031"),
    ("imagenet_resnet50", {"widen_factor": 0.25}, True, 53, "ea312f608afa35a2"),
]


@pytest.mark.parametrize("name,options,downsample,count,digest", PINNED)
def test_cli_models_select_what_they_selected_before(name, options, downsample, count, digest):
    with torch.device("meta"):
        model = create_model(name, **options)
    names = sparse_parameter_names(model, sparse_resnet_downsample=downsample)
    assert (len(names), hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]) == (count, digest)


class Mixed(nn.Module):
    """Every kind of matrix weight the rule knows, and parameters it must leave dense."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3)
        self.embed = nn.Embedding(5, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.norm = nn.LayerNorm(4)
        self.pair = nn.Bilinear(4, 4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens))
        h, _ = self.attn(h, h, h)
        return self.head(self.pair(h, h)).sum() + self.up(x).sum()


EXPECTED = ["up.weight", "attn.in_proj_weight", "attn.out_proj.weight", "pair.weight", "head.weight"]


def test_library_and_cli_select_the_same_weights_of_a_mixed_model():
    model = Mixed()
    assert select_weights(model) == EXPECTED
    assert sparse_parameter_names(model) == EXPECTED  # the CLI's rule for a model without its own list
    assert [layer_type(model, n) for n in EXPECTED] == ["conv", "fc", "fc", "fc", "fc"]
    # the command line gives each its per-type density (conv / fc), as for the built-in models
    cfg = TrainConfig(initial_sparsity_conv=0.75, initial_sparsity_fc=0.9)
    assert densities(cfg, model) == pytest.approx({n: 0.25 if n == "up.weight" else 0.1 for n in EXPECTED})


def test_the_library_trains_the_mixed_model_with_the_default_rule():
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier = Sparsifier(model, opt, policy=SET(when=Periodic(1)), densities=0.5)
    assert list(sparsifier.params) == EXPECTED
    for _ in range(2):  # each step changes the topology
        opt.zero_grad()
        model(torch.randn(1, 2, 4, 4), torch.tensor([[1, 2, 3]])).backward()
        opt.step()
    for name in EXPECTED:
        weight, sp = model.get_parameter(name), sparsifier.params[name]
        assert sp.num_active == int(0.5 * weight.numel() + 0.1)
        assert not bool(weight[~sp.mask].any())  # grown entries start at zero, dropped ones are zeroed
