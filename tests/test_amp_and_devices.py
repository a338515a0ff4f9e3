"""Device and mixed-precision defects of issue 22 (items 4, 11, 12, 13), on CPU: a 'meta' model
stands in for a CUDA one where only the device matters, and a CPU ``GradScaler`` does the skipping
and unscaling that fp16 training does on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse import distributed
from dynsparse.errors import DynsparseError


class _Stop(Exception):
    pass


@pytest.mark.parametrize("sparsifier", [None, object()])  # a dense run; --tied's object has no params
def test_debug_distributed_checksums_live_on_the_collectives_device(monkeypatch, sparsifier):
    """Item 4: a dense or --tied run under NCCL stacked a CPU zero (no masks) with the weights'
    checksum on the GPU; the meta device plays the GPU here."""
    model = nn.Linear(3, 2, device="meta")
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        raise _Stop

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    with pytest.raises(_Stop):  # reached the collective: the stack worked
        distributed.check_consistency(model, sparsifier, distributed.DistInfo(0, 2, 0), "here")
    assert seen == [torch.device("meta")]
