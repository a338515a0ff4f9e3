"""Device and mixed-precision defects of issue 22 (items 4, 11, 12, 13), on CPU: a 'meta' model
stands in for a CUDA one where only the device matters, and a CPU ``GradScaler`` does the skipping
and unscaling that fp16 training does on a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse.errors import DynsparseError
from dynsparse.training import distributed


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


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _train(policy, *, scaler: bool, backend: str = "masked", steps: int = 12, inf_at: int | None = None,
           init_scale: float = 256.0):
    """A plain loop with the sparsifier attached by hooks: returns the sparsifier and the masks."""
    from dynsparse.sparse import Sparsifier
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s = Sparsifier(model, opt, policy=policy, densities=0.2, total_steps=100, backend=backend)
    sc = torch.amp.GradScaler("cpu", init_scale=init_scale) if scaler else None
    for i, (x, y) in enumerate(_batches(steps)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if i == inf_at:
            loss = loss * torch.tensor(float("inf"))  # an fp16 overflow: the scaler skips this step
        if sc is None:
            loss.backward()
            opt.step()
        else:
            sc.scale(loss).backward()
            sc.step(opt)
            sc.update()
    return s, {n: sp.topology().clone() for n, sp in s.params.items()}


def test_snfs_under_a_grad_scaler_without_clipping_matches_the_run_without_one():
    """Item 12: the off-mask gradient SNFS's momentum reads was left in scaled units when the
    scaler's unscale_ did not bump the gradient's version (it does not on CPU): SNFS's topology
    then differed from the unscaled run's from its second update on."""
    from dynsparse.sparse import SNFS, Periodic
    plain, masks = _train(SNFS(when=Periodic(3)), scaler=False)
    scaled, masks_scaled = _train(SNFS(when=Periodic(3)), scaler=True)
    assert len(plain.events) >= 3 and plain.total_grown > 0
    assert [e.pruned for e in plain.events] == [e.pruned for e in scaled.events]
    for n in masks:
        assert torch.equal(masks[n], masks_scaled[n]), n
    for n in plain.policy.momentum:
        assert torch.equal(plain.policy.momentum[n], scaled.policy.momentum[n]), n


@pytest.mark.parametrize("inf_at", [2, 5])  # before the first change; after one (the hook survives a resize)
def test_csr_rigl_after_a_step_the_scaler_skips_leaves_no_trace(inf_at):
    """Item 11: the skipped step's captured activations and output gradients (with the inf)
    stayed in the CSR capture and were added into the next update's grow scores: RigL grew fewer
    entries than it dropped and the density drifted. Now CSR does what masked does."""
    from dynsparse.sparse import Periodic, RigL
    # the step before a due update overflows and is skipped
    masked, masks = _train(RigL(when=Periodic(3)), scaler=True, inf_at=inf_at)
    csr, masks_csr = _train(RigL(when=Periodic(3)), scaler=True, backend="csr", inf_at=inf_at)
    assert masked.step_count == csr.step_count == 11  # the skipped step did not count
    assert masked.total_pruned == masked.total_grown > 0
    assert (csr.total_pruned, csr.total_grown) == (masked.total_pruned, masked.total_grown)
    assert csr.densities() == masked.densities()
    for n in masks:
        flat = torch.nonzero(masks[n].reshape(-1)).view(-1)
        assert torch.equal(masks_csr[n], flat), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_csr_refuses_low_precision_weights_in_one_line(dtype):
    """Item 13: CSR under bf16/fp16 weights ended in a raw sparse_sampled_addmm error."""
    from dynsparse.sparse import RigL, Sparsifier
    from dynsparse.sparse.layers.csr_linear import CSRLinear
    model = _mlp().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DynsparseError, match=r"^0\.weight: CSR weights hold float32 or float64 values, not .*autocast"):
        Sparsifier(model, opt, policy=RigL(), densities=0.2, total_steps=10, backend="csr")
    # auto keeps such weights masked; a CSR layer cast down afterwards says the same at its forward
    s = Sparsifier(_mlp().to(dtype), None, policy=RigL(), densities=0.1, total_steps=10, backend="auto", batch_size=16)
    assert {sp.storage for sp in s.params.values()} == {"masked"}
    layer = CSRLinear(8, 4, density=0.5).to(dtype)
    with pytest.raises(DynsparseError, match="float32 or float64"):
        layer(torch.randn(2, 8, dtype=dtype))


def test_a_nan_off_the_mask_is_reported_as_a_nan():
    """Item 13: fp16 weights with Adam (eps underflows to 0: 0/0 off the mask) were reported as
    'weights nonzero off the mask ... something changed them behind the sparsifier'."""
    from dynsparse.sparse import Periodic, RigL, Sparsifier
    model = _mlp().to(torch.float16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    Sparsifier(model, opt, policy=RigL(when=Periodic(2)), densities=0.2, total_steps=100)
    with pytest.raises(DynsparseError, match=r"NaN or inf .*'0\.weight'.*diverged") as e:
        for x, y in _batches(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.half()).float(), y).backward()
            opt.step()
    assert "behind the sparsifier" not in str(e.value)


@pytest.mark.parametrize("batch_size", [None, 0, 32.0])
def test_auto_backend_requires_the_batch_size(batch_size):
    """Item 13: backend='auto' without batch_size silently assumed 128."""
    from dynsparse.sparse import RigL, Sparsifier
    with pytest.raises(DynsparseError,
                       match=r"backend 'auto' picks CSR or masked by the training batch size.*batch_size="):
        Sparsifier(_mlp(), None, policy=RigL(), densities=0.1, total_steps=10, backend="auto", batch_size=batch_size)
    s = Sparsifier(_mlp(), None, policy=RigL(), densities=0.1, total_steps=10, backend="auto", batch_size=32)
    assert {sp.storage for sp in s.params.values()} == {"csr"}  # density 0.1 is below every crossover


def test_csr_snfs_momentum_is_in_true_units_under_a_grad_scaler():
    """The CSR storage's dense gradient is formed from captured products of the scaled backward:
    it gets the factor the values' gradient got from unscale_, so SNFS's momentum is the one
    without a scaler (it was x256)."""
    from dynsparse.sparse import SNFS, Periodic
    plain, masks = _train(SNFS(when=Periodic(3)), scaler=False, backend="csr")
    scaled, masks_scaled = _train(SNFS(when=Periodic(3)), scaler=True, backend="csr")
    assert plain.total_grown > 0
    for n in masks:
        assert torch.equal(masks[n], masks_scaled[n]), n
        assert torch.equal(plain.policy.momentum[n], scaled.policy.momentum[n]), n
