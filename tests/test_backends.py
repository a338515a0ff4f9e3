"""The CSR storage behind the engine gives the masked storage's answers, method by method.

Same seed, same model: the CSR run must draw the same topology, drop and grow the same entries,
and reach the same losses up to floating-point reordering, for a few hundred steps with topology
changes, including DSR's moves of entries between layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynsparse import Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.sparse.layers.csr_linear import CSRLinear, CSRWeight
from dynsparse.sparse.policies.deepr import DeepR
from dynsparse.sparse.policies.dsr import DSR
from dynsparse.sparse.policies.mest import MEST
from dynsparse.sparse.policies.pruning import GradualPruning
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policies.snfs import SNFS
from dynsparse.sparse.policies.static import Static
from dynsparse.sparse.when import AtEpochEnds, Periodic

STEPS, EPOCH = 240, 40


def mlp(seed=0):
    # tanh, not ReLU: a unit whose input is within rounding of 0 would take the other branch in
    # one storage, a real but chaotic difference that says nothing about the storage
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))


POLICIES = {
    "set": lambda: SET(0.2, when=Periodic(20)),
    "set-scaling": lambda: SET(0.2, scaling=True, when=Periodic(20)),
    "dsr": lambda: DSR(n_prune=40, when=Periodic(20)),
    "deepr": lambda: DeepR(eta=0.01, temperature=lambda epoch: 1e-4),
    "rigl": lambda: RigL(0.3, when=Periodic(20)),
    "snfs": lambda: SNFS(0.3, when=Periodic(EPOCH)),
    "mest": lambda: MEST(0.2, when=Periodic(20)),
    "static": Static,
    "prune": lambda: GradualPruning({"0.weight": 0.9, "2.weight": 0.8, "4.weight": 0.5}, when=AtEpochEnds(1, 1, 3)),
}


def train(backend, policy, *, optimizer="sgd", accumulate=1, new_weights="zero", hooks=True, steps=STEPS, model=None):
    m = model if model is not None else mlp()
    opt = (torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) if optimizer == "sgd"
           else torch.optim.Adam(m.parameters(), lr=0.01))
    dens = 1.0 if isinstance(policy, GradualPruning) else 0.3
    s = Sparsifier(m, opt, policy=policy, densities=dens, backend=backend, seed=3, new_weights=new_weights,
                   hooks=hooks)
    g = torch.Generator().manual_seed(11)
    losses, topologies = [], []
    for step in range(steps):
        s.set_epoch(step // EPOCH)
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = torch.randn(16, 24, generator=g), torch.randint(10, (16,), generator=g)
            loss = F.cross_entropy(m(x), y) / accumulate
            loss.backward()
        if not hooks:
            s.before_optimizer_step()
        opt.step()
        if not hooks:
            s.step()
        losses.append(loss.item())
        if (step + 1) % EPOCH == 0:
            s.end_epoch()
            topologies.append({n: sp.topology().clone() for n, sp in s.params.items()})
    return losses, s, m, topologies


def flat(t):
    return torch.nonzero(t.reshape(-1)).view(-1) if t.dtype == torch.bool else t


def assert_same(a, b, atol=2e-5):
    (la, sa, _, ta), (lb, sb, _, tb) = a, b
    assert max(abs(x - y) for x, y in zip(la, lb)) < atol
    assert sa.totals() == sb.totals()
    assert sa.densities() == sb.densities()
    for snap_a, snap_b in zip(ta, tb):
        for n in snap_a:
            assert torch.equal(flat(snap_a[n]), flat(snap_b[n])), n
    ea, eb = sa.export(), sb.export()
    assert sorted(ea) == sorted(eb)
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_csr_gives_the_masked_answers(name):
    a = train("masked", POLICIES[name]())
    b = train("csr", POLICIES[name]())
    assert all(sp.storage == "csr" for sp in b[1].params.values())
    assert sum(isinstance(m, CSRLinear) for m in b[2].modules()) == 3
    if name not in ("static",):
        assert a[1].totals()["total_pruned"] > 0  # topology really changed
    assert_same(a, b)


def test_dsr_moves_entries_between_layers_on_csr():
    _, s, m, _ = train("csr", POLICIES["dsr"](), steps=230)  # the last change (step 220) left layers uneven
    counts = {n: sp.num_active for n, sp in s.params.items()}
    initial = {n: int(0.3 * sp.num_entries + 0.1) for n, sp in s.params.items()}
    assert counts != initial and sum(counts.values()) == sum(initial.values())
    for n, sp in s.params.items():  # storage really resized: values, indices and momentum
        w = sp.weight
        assert w.values.numel() == counts[n] == w.col_indices.numel() == int(w.crow_indices[-1])
        assert s.optimizer.state[w.values]["momentum_buffer"].shape == w.values.shape


@pytest.mark.parametrize("variant", ["adam", "accumulate", "initial-weights", "explicit-calls"])
def test_csr_same_answers_with_adam_accumulation_new_weights_and_no_hooks(variant):
    kw = {"adam": dict(optimizer="adam"), "accumulate": dict(accumulate=3),
          "initial-weights": dict(new_weights="initial"), "explicit-calls": dict(hooks=False)}[variant]
    for policy in (lambda: DSR(n_prune=40, when=Periodic(20)), lambda: RigL(0.3, when=Periodic(20))):
        assert_same(train("masked", policy(), steps=120, **kw), train("csr", policy(), steps=120, **kw))


def test_checkpoint_resume_is_exact_on_csr():
    policy = lambda: DSR(n_prune=40, when=Periodic(20))  # noqa: E731
    full = train("csr", policy(), steps=100)
    _, s, m, _ = train("csr", policy(), steps=60)
    saved = {"model": m.state_dict(), "opt": s.optimizer.state_dict(), "sp": s.state_dict()}
    saved = {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()} if k != "opt" else v
             for k, v in saved.items()}
    # a fresh run (other random topology) takes the checkpoint: sizes differ, loading resizes
    m2 = mlp(seed=1)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    s2 = Sparsifier(m2, opt2, policy=policy(), densities=0.3, backend="csr", seed=99)
    m2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    s2.load_state_dict(saved["sp"])
    g = torch.Generator().manual_seed(11)
    for _ in range(60):  # replay the data stream of the first 60 steps
        torch.randn(16, 24, generator=g), torch.randint(10, (16,), generator=g)
    for _ in range(40):
        x, y = torch.randn(16, 24, generator=g), torch.randint(10, (16,), generator=g)
        opt2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        opt2.step()
    assert abs(loss.item() - full[0][-1]) < 1e-6
    for n, sp in full[1].params.items():
        assert torch.equal(sp.topology(), s2.params[n].topology())
        assert torch.equal(sp.param, s2.params[n].param)


def test_export_to_dense_architecture_and_sparse_tensors():
    _, s, m, _ = train("csr", POLICIES["dsr"](), steps=60)
    dense = mlp(seed=5)
    dense.load_state_dict(s.export())
    x = torch.randn(7, 24)
    torch.testing.assert_close(dense(x), m(x))
    for layout in (torch.sparse_coo, torch.sparse_csr):
        tensors = s.sparse_tensors(layout)
        for n, t in tensors.items():
            assert t.layout == layout
            torch.testing.assert_close(t.to_dense(), s.params[n].masked_weight())
    assert s.param_counts()["sparse_total"] == sum(p.numel() for p in mlp().parameters() if p.dim() == 2)


def test_auto_backend_chooses_by_density_and_keeps_convs_masked():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 64), nn.Linear(64, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = Sparsifier(m, opt, policy=Static(), densities={"0.weight": 0.1, "2.weight": 0.05, "3.weight": 0.9},
                   backend="auto", batch_size=128)
    assert {n: sp.storage for n, sp in s.params.items()} == {"0.weight": "masked", "2.weight": "csr",
                                                             "3.weight": "masked"}
    assert isinstance(m[2], CSRLinear) and isinstance(m[3], nn.Linear)
    assert any(p is m[2].weight.values for g in opt.param_groups for p in g["params"])
    assert not any(p.dim() == 2 and p.shape == (64, 288) for g in opt.param_groups for p in g["params"])
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()


def test_bad_backend_requests_are_refused():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(DynsparseError, match="nn.Linear weights and the block convs of a WideResNet.*'auto'"):
        Sparsifier(conv, None, policy=Static(), densities=0.1, backend="csr")
    with pytest.raises(DynsparseError, match="sparse backend .coo.; valid choices: auto, csr, masked"):
        Sparsifier(mlp(), None, policy=Static(), densities=0.1, backend="coo")
    with pytest.raises(DynsparseError, match="mask_optimizer_state=False"):
        Sparsifier(mlp(), None, policy=Static(), densities=0.1, backend="csr", mask_optimizer_state=False)


def test_a_model_built_sparse_is_adopted_without_a_dense_weight():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    m = nn.Sequential(CSRLinear(50_000, 40_000, density=1e-5, generator=gen), nn.ReLU(), nn.Linear(40_000, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    s = Sparsifier(m, opt, policy=SET(0.2, when=Periodic(2)), densities={"2.weight": 0.5}, backend="masked")
    assert s.params["0.weight"].storage == "csr" and s.params["2.weight"].storage == "masked"
    assert s.param_counts()["sparse_total"] == 50_000 * 40_000 + 40_000 * 3
    before = s.params["0.weight"].topology().clone()
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(4, 50_000)).sum().backward()
        opt.step()
    after = s.params["0.weight"]
    assert after.num_active == before.numel() and not torch.equal(after.topology(), before)
    with pytest.raises(DynsparseError, match="already a CSR weight"):
        Sparsifier(m, None, policy=Static(), densities={"0.weight": 0.5})
    assert isinstance(m[0].weight, CSRWeight)


def test_csr_products_stay_float32_under_bf16_autocast():
    _, s, m, _ = train("csr", Static(), steps=1)
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    # MKL's sparse kernels have no bfloat16: the CSR layers run in float32 (a dense nn.Linear would give bf16)
    assert y.dtype == torch.float32
    assert torch.equal(y, m(x))  # the very float32 products, not bf16 ones cast back
