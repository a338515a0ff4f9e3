"""The storage protocol (dynsparse/sparse/storage.py): the same tests against masked and CSR storage,
each through the public Sparsifier on a tiny MLP. Drop-side handles are mapped to flat indices with
``active_indices()`` only, so nothing here knows how either storage numbers its entries."""
import pytest
import torch
from torch import nn

from dynsparse import SET, SNFS, RigL, Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.sparse import SparseStorage
from dynsparse.sparse.compact import pack_state, unpack_state
from dynsparse.sparse.storage import DenseScores, GrowScores
from dynsparse.sparse.when import Periodic

DENSITY = 0.5
K = 5


def build(storage: str, policy=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=policy or SET(0.3, when=Periodic(1000)), densities=DENSITY,
                   total_steps=10, backend=storage, seed=3)
    return model, opt, s


def flat_active(sp) -> torch.Tensor:
    """Sorted flat indices of the active entries, from ``topology()`` (a bool mask or flat indices)."""
    t = sp.topology()
    return torch.nonzero(t.reshape(-1)).view(-1) if t.dtype == torch.bool else torch.sort(t.view(-1)).values


def flat_of(sp, handles: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Flat indices of drop-side ``handles``: position ``i`` of ``active_indices()`` is ``flat[i]``."""
    return flat[torch.searchsorted(sp.active_indices(), handles)]


@pytest.fixture(params=["masked", "csr"])
def setup(request):
    model, opt, s = build(request.param)
    return request.param, model, opt, s


def test_views_satisfy_the_protocol(setup):
    storage, _, _, s = setup
    assert len(s.params) == 2
    for sp in s.params.values():
        assert isinstance(sp, SparseStorage)
        assert sp.storage == storage
    assert not isinstance(object(), SparseStorage)


def test_num_active_matches_the_density_and_the_topology(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        assert abs(sp.num_active - DENSITY * sp.num_entries) <= 1
        assert flat_active(sp).numel() == sp.num_active == sp.active_indices().numel()
        assert sp.num_free == sp.num_entries - sp.num_active
        assert sp.density == pytest.approx(sp.num_active / sp.num_entries)


def test_magnitude_of_active_entries_is_abs_weight(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        dense = sp.masked_weight().reshape(-1)
        flat = flat_active(sp)
        assert dense.ne(0).sum() == sp.num_active  # weights are zero exactly off the topology
        got = sp.magnitude()[sp.active_indices()]
        assert torch.equal(got, dense[flat].abs())


def test_lowest_active_picks_the_k_smallest(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        m = sp.magnitude()
        idx = sp.lowest_active(m, K)
        assert idx.numel() == K
        assert torch.isin(idx, sp.active_indices()).all()
        expected = torch.sort(m[sp.active_indices()]).values[:K]
        assert torch.equal(torch.sort(m[idx]).values, expected)


def test_grow_random_avoids_active_and_dropped_and_counts(setup):
    _, _, opt, s = setup
    g = torch.Generator().manual_seed(0)
    for sp in s.params.values():
        before = flat_active(sp)
        handles = sp.lowest_active(sp.magnitude(), K)
        dropped = flat_of(sp, handles, before)
        gone = sp.drop(handles)
        new = sp.grow_random(K, gone, g)
        assert new.numel() == K == torch.unique(new).numel()
        assert not torch.isin(new, before).any()  # neither active nor just dropped
        sp.activate(new)
        sp.commit(opt)
        after = flat_active(sp)
        assert sp.num_active == before.numel() == after.numel()
        expected = torch.sort(torch.cat([before[~torch.isin(before, dropped)], new])).values
        assert torch.equal(after, expected)


def test_grow_random_asked_for_too_many_fills_exactly_the_free_space(setup):
    _, _, _, s = setup
    g = torch.Generator().manual_seed(0)
    for sp in s.params.values():
        before = flat_active(sp)
        handles = sp.lowest_active(sp.magnitude(), K)
        gone = sp.drop(handles)
        new = sp.grow_random(sp.num_free, gone, g)  # more than there is room for (the dropped are excluded)
        free = torch.ones(sp.num_entries, dtype=torch.bool)
        free[before] = False
        assert torch.equal(torch.sort(new).values, torch.nonzero(free).view(-1))


def test_grow_top_grows_at_the_top_free_scores(setup):
    _, _, opt, s = setup
    for sp in s.params.values():
        before = flat_active(sp)
        handles = sp.lowest_active(sp.magnitude(), K)
        gone = sp.drop(handles)
        scores = torch.randperm(sp.num_entries, generator=torch.Generator().manual_seed(1)).float()
        new = sp.grow_top(DenseScores(scores), K, gone)
        free = torch.ones(sp.num_entries, dtype=torch.bool)
        free[before] = False
        expected = torch.topk(scores.masked_fill(~free, -1.0), K).indices
        assert torch.equal(torch.sort(new).values, torch.sort(expected).values)
        sp.activate(new)
        sp.commit(opt)
        assert sp.num_active == before.numel()


def test_weights_stay_zero_off_the_topology_after_updates(setup):
    storage, _, _, _ = setup
    model, opt, s = build(storage, SET(0.3, when=Periodic(2)))
    g = torch.Generator().manual_seed(0)
    tops = []
    for _ in range(4):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        tops.append({n: flat_active(sp) for n, sp in s.params.items()})
    assert any(not torch.equal(tops[0][n], tops[-1][n]) for n in tops[0])  # the topology did change
    exported = s.export()
    for name, sp in s.params.items():
        off = torch.ones(sp.num_entries, dtype=torch.bool)
        off[flat_active(sp)] = False
        assert sp.off_mask_nonzero() == 0
        assert sp.masked_weight().reshape(-1)[off].eq(0).all()
        assert exported[name].reshape(-1)[off].eq(0).all()
        # entries grown by the last update start at zero (new_weights="zero"): at most num_active are nonzero
        assert 0 < exported[name].reshape(-1).ne(0).sum() <= sp.num_active


@pytest.mark.parametrize("form", ["own", "mask", "indices"])
def test_topology_round_trip(setup, form):
    _, _, opt, s = setup
    g = torch.Generator().manual_seed(0)
    for sp in s.params.values():
        saved_flat = flat_active(sp)
        saved = {"own": sp.topology(), "indices": saved_flat}.get(form)
        if saved is None:
            saved = torch.zeros(sp.num_entries, dtype=torch.bool)
            saved[saved_flat] = True
            saved = saved.view(sp.topology().shape if sp.topology().dtype == torch.bool else sp.shape)
        handles = sp.lowest_active(sp.magnitude(), K)  # change it, then load the saved one back
        sp.activate(sp.grow_random(K, sp.drop(handles), g))
        sp.commit(opt)
        assert not torch.equal(flat_active(sp), saved_flat)
        sp.load_topology(saved, opt)
        assert torch.equal(flat_active(sp), saved_flat)
        assert sp.num_active == saved_flat.numel()


# ---- the members that replaced storage branches (issue 24, item 3) ---------------------------------

X = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))


def dense_twin(s, model):
    """A plain dense copy of the model at the exported weights: its gradients are the reference."""
    twin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    twin.load_state_dict(s.export())
    twin(X).square().mean().backward()
    return {"0.weight": twin[0].weight.grad, "2.weight": twin[2].weight.grad}


def test_drop_returns_its_record_and_the_label_names_the_storage(setup):
    storage, _, _, s = setup
    for sp in s.params.values():
        before = sp.num_active
        gone = sp.drop(sp.lowest_active(sp.magnitude(), K))
        assert gone.count == K and sp.num_active == before - K
        assert sp.label == ("" if storage == "masked" else "csr")


def test_active_grad_scores_and_adding_to_the_active_gradient(setup):
    _, model, opt, s = setup
    for sp in s.params.values():
        assert not sp.has_gradient and sp.active_grad_scores() is None
    reference = dense_twin(s, model)
    model(X).square().mean().backward()
    for name, sp in s.params.items():
        assert sp.has_gradient
        flat = flat_active(sp)
        got = sp.active_grad_scores()
        assert torch.allclose(got[sp.active_indices()], reference[name].reshape(-1)[flat].abs(), atol=1e-7)
        sp.param.grad.zero_()  # (a test may reach the parameter; a policy may not)
        values = torch.arange(1.0, sp.num_active + 1)
        sp.add_to_active_grad(values)
        got = sp.active_grad_scores()
        assert torch.equal(got[sp.active_indices()], values)  # in active_indices() order
        assert got.sum() == values.sum()  # nothing off the topology


def test_dense_gradient_through_the_hooks_is_the_true_gradient_scaled(setup):
    storage, _, _, _ = setup
    model, opt, s = build(storage, RigL(0.3, when=Periodic(1, end_step=100)))
    reference = dense_twin(s, model)
    opt.zero_grad()
    model(X).square().mean().backward()
    for p in model.parameters():  # as GradScaler.unscale_ or clipping would, after the backward
        p.grad.mul_(0.5)
    s.before_optimizer_step()  # the next step is an update: the dense gradient is gathered
    for name, sp in s.params.items():
        scores = s.signals[name]
        assert isinstance(scores, GrowScores)
        assert torch.allclose(scores.flat(), 0.5 * reference[name].reshape(-1).abs(), atol=1e-7)
        assert torch.allclose(sp.active_mean(scores), scores.flat()[flat_active(sp)].mean())


def test_dense_gradient_every_step_is_the_true_gradient(setup):
    storage, _, _, _ = setup
    model, opt, s = build(storage, SNFS(0.3, beta=0.5, when=Periodic(1000)))
    reference = dense_twin(s, model)
    opt.zero_grad()
    model(X).square().mean().backward()
    s.before_optimizer_step()  # SNFS's momentum, m = beta m + g, from the dense gradient (m starts at 0)
    for name in s.params:
        assert torch.allclose(s.policy.momentum[name], reference[name], atol=1e-7)


def test_grow_side_scores_of_a_dense_tensor_and_their_active_mean(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        t = torch.randn(sp.shape, generator=torch.Generator().manual_seed(2))
        scores = sp.dense_scores(t)
        assert torch.equal(scores.flat(), t.abs().reshape(-1))
        assert torch.allclose(sp.active_mean(scores), t.abs().reshape(-1)[flat_active(sp)].mean())
        zeros = sp.dense_zeros()
        assert zeros.shape == sp.shape and not zeros.any()


def test_signs_flags_and_checkpointed_state(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        signs = sp.signs()
        assert signs.dtype == torch.int8
        flat = flat_active(sp)
        positive = sp.gather_flags(signs > 0)[sp.active_indices()]
        assert torch.equal(positive, sp.masked_weight().reshape(-1)[flat] > 0)
        assert torch.equal(sp.state_from_checkpoint(sp.state_for_checkpoint(signs.clone())), signs)


def test_to_sparse_holds_the_true_nonzeros(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        dense = sp.masked_weight()
        for layout in (torch.sparse_coo, torch.sparse_csr):
            t = sp.to_sparse(layout)
            assert t.layout == layout and torch.equal(t.to_dense(), dense)
            assert t.values().ne(0).all()


def test_export_has_the_dense_architectures_keys(setup):
    _, model, _, s = setup
    with torch.no_grad():  # weights moved behind the sparsifier (off the mask too, for masked storage)
        for p in model.parameters():
            p.add_(1.0)
    exported = s.export()
    dense = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in dense.state_dict().items()}
    for name, sp in s.params.items():
        assert torch.equal(exported[name], sp.masked_weight())
        assert exported[name].ne(0).sum() == sp.num_active  # masked, whatever the parameter holds
    assert torch.equal(exported["0.bias"], dict(model.named_parameters())["0.bias"])


def test_a_compact_checkpoint_holds_every_sparse_tensor_by_its_entries(setup):
    _, model, opt, s = setup
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sparsifier": s.state_dict()}
    packed = pack_state(state, s)
    assert set(packed["compact"]) == set(s.params) and not packed["sparsifier"]["masks"]
    back = unpack_state(packed)
    for name, sp in s.params.items():
        saved = back["sparsifier"]["masks"][name]
        got = torch.nonzero(saved.reshape(-1)).view(-1) if saved.dtype == torch.bool else saved
        assert torch.equal(got, flat_active(sp))
    assert set(back["model"]) == set(state["model"])
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())


def test_load_values_sets_the_active_entries_only(setup):
    _, _, _, s = setup
    for sp in s.params.values():
        dense = torch.randn(sp.shape, generator=torch.Generator().manual_seed(4))
        sp.load_values(dense)
        on = torch.zeros(sp.num_entries, dtype=torch.bool)
        on[flat_active(sp)] = True
        assert torch.equal(sp.masked_weight().reshape(-1), torch.where(on, dense.reshape(-1), 0.0))
        assert sp.off_mask_nonzero() == 0


def test_grow_scores_must_be_grow_scores():
    class Raw(SET):
        def grow_scores(self, ctx, sp):
            return sp.magnitude()  # drop-side scores, a plain tensor: not where to grow

    _, _, s = build("masked", Raw(0.3, when=Periodic(1000)))
    with pytest.raises(DynsparseError, match=r"Raw.grow_scores returned a Tensor: return GrowScores"):
        s.policy.update(s.context())
