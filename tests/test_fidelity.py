"""Issue 11: the original's behaviour for --copy-mask-from, DeepR at density 1, --prune
--threshold-prune, --tied, SET with --rewire-scaling, bias init and the stop-rewire checkpoint."""
from __future__ import annotations

import torch

from dynsparse.models import create_model


def test_no_bn_mlp_and_resnet_fc_biases_start_at_zero():
    torch.manual_seed(0)
    mlp = create_model("mnist_mlp", batch_norm=False)
    for fc in (mlp.fc1, mlp.fc_int, mlp.fc2):
        assert fc.bias is not None and torch.equal(fc.bias, torch.zeros_like(fc.bias))
    rn = create_model("imagenet_resnet50", widen_factor=0.125, num_classes=7)
    assert torch.equal(rn.fc.bias, torch.zeros(7))
