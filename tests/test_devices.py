"""Device and layout defects a first GPU run would hit (issue 22), each caught on a CPU: with the
``meta`` device (shapes only: any host read fails), a fake CUDA device (``FakeTensorMode``:
device mixes and data-dependent ops raise), mocks, or channels_last CPU tensors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dynsparse import Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.models import MnistMLP
from dynsparse.models.convnets import ResNet50, WideResNet
from dynsparse.sparse.policies.deepr import DeepR
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policies.snfs import SNFS
from dynsparse.sparse.when import Periodic
from dynsparse.training import distributed

ROOT = Path(__file__).resolve().parents[1]


def convnet(device=None):
    return nn.Sequential(nn.Conv2d(3, 8, 3, device=device), nn.ReLU(), nn.Conv2d(8, 8, 3, device=device), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10, device=device))


POLICIES = {
    "rigl": lambda: RigL(0.3, when=Periodic(5)),
    "snfs": lambda: SNFS(0.3, when=Periodic(5)),
    "set": lambda: SET(0.3, when=Periodic(5)),
    "deepr": lambda: DeepR(eta=0.05, temperature=lambda epoch: 1e-3),
}


def steps(m, opt, s, n, *, hooks=True, device=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(10, (8,), generator=g)
        x, y = x.to(device or next(m.parameters()).device), y.to(device or next(m.parameters()).device)
        if next(m.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        if not hooks:
            s.before_optimizer_step()
        opt.step()
        if not hooks:
            s.step()


# ---- 1: the generator lives on the CPU; its state restores from any device ----------------------
def test_generator_lives_on_the_cpu_whatever_the_weights_device():
    with FakeTensorMode(allow_non_fake_inputs=True):  # a CUDA model, without a GPU
        m = convnet("cuda")
        s = Sparsifier(m, torch.optim.SGD(m.parameters(), lr=0.1), policy=RigL(when=Periodic(5)), densities=0.3,
                       init="random", total_steps=20)
        assert {sp.mask.device.type for sp in s.params.values()} == {"cuda"}
    assert s.generator.device.type == "cpu"
    assert s.state_dict()["generator"].numel() == torch.Generator().get_state().numel()  # a CPU state, always


class OnGPU:
    """What ``torch.load(map_location="cuda")`` hands back for the generator state: a CUDA
    ByteTensor, which ``Generator.set_state`` refuses; only its CPU copy is usable."""

    def __init__(self, t):
        self.t, self.device = t, torch.device("cuda")

    def to(self, device, *args, **kwargs):
        return self.t.clone() if torch.device(device).type == "cpu" else self


def test_generator_state_restores_from_a_tensor_on_another_device():
    def build():
        torch.manual_seed(0)
        m = convnet()
        return m, Sparsifier(m, torch.optim.SGD(m.parameters(), lr=0.1), policy=SET(0.3, when=Periodic(5)),
                             densities=0.3, seed=4)

    _, a = build()
    state = a.state_dict()
    _, b = build()
    b.generator.manual_seed(99)
    b.load_state_dict({**state, "generator": OnGPU(state["generator"])})
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(torch.rand(5, generator=a.generator), torch.rand(5, generator=b.generator))


# ---- 2: channels_last --------------------------------------------------------------------------
@pytest.mark.parametrize("name,new_weights", [("deepr", "zero"), ("set", "initial"), ("rigl", "initial")])
def test_channels_last_gives_the_contiguous_answers(name, new_weights):
    """DeepR's noise and flips, and growth with --big-new-weights, on channels_last conv weights."""
    out = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        m = convnet().to(memory_format=layout)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        s = Sparsifier(m, opt, policy=POLICIES[name](), densities=0.3, new_weights=new_weights, total_steps=100)
        steps(m, opt, s, 12)
        assert m[0].weight.is_contiguous(memory_format=layout)
        out.append((s.totals(), {n: sp.mask.clone() for n, sp in s.params.items()}, s.export()))
    (ta, ma, ea), (tb, mb, eb) = out
    assert ta == tb and ta["total_pruned"] > 0
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], atol=1e-5, rtol=1e-4)


def test_masks_take_the_weights_memory_format():
    torch.manual_seed(0)
    m = convnet()
    s = Sparsifier(m, torch.optim.SGD(m.parameters(), lr=0.1), policy=SET(when=Periodic(5)), densities=0.3)
    m.to(memory_format=torch.channels_last)  # after construction, as a loop might
    sp = s.params["0.weight"]
    assert sp.mask_view().is_contiguous(memory_format=torch.channels_last)
    assert sp.inverse_mask_view().is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(sp.mask_view().contiguous(), sp.mask.to(torch.float32))


# ---- 3: the sparsifier follows model.to(...) -----------------------------------------------------
def to_meta(m):
    """``m.to("meta")`` keeping the Parameter objects, as ``m.to("cuda")`` does (a CPU tensor's
    storage cannot be swapped for a meta one in place, so the tensors are swapped)."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("hooks", [False, True], ids=["explicit", "hooks"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_sparsifier_follows_the_model_to_another_device(name, hooks):
    """Built on the CPU, then moved (as HF's Trainer moves the model it is given): masks,
    caches, DeepR's signs and SNFS's momentum follow. On ``meta`` any host read fails, so the
    steps between updates (and DeepR's every-step updates) are also shown sync-free. With hooks,
    one CPU step first: the first step reads the weights once (a host sync, fine on a GPU)."""
    torch.manual_seed(0)
    m = convnet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)  # no momentum: no optimizer state left on the CPU
    s = Sparsifier(m, opt, policy=POLICIES[name](), densities=0.3, total_steps=100, hooks=hooks)
    if hooks:
        steps(m, opt, s, 1)
        opt.zero_grad()
    weights = [p for p in m.parameters()]
    to_meta(m)
    assert all(p is q for p, q in zip(weights, m.parameters())) and weights[0].device.type == "meta"
    steps(m, opt, s, 4 - hooks, hooks=hooks, device="meta")  # to step 4: the check before step 5's update reads
    assert s.step_count == 4
    assert {sp.mask.device.type for sp in s.params.values()} == {"meta"}
    assert {sp.mask_view().device.type for sp in s.params.values()} == {"meta"}
    if name == "deepr":
        assert {t.device.type for t in s.policy.signs.values()} == {"meta"}
    if name == "snfs":
        assert {t.device.type for t in s.policy.momentum.values()} == {"meta"}


def test_masks_follow_the_weights_dtype():
    torch.manual_seed(0)
    m = convnet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    s = Sparsifier(m, opt, policy=RigL(when=Periodic(3)), densities=0.3, total_steps=20)
    steps(m, opt, s, 1)
    m.double()
    g = torch.Generator().manual_seed(0)
    for step in range(2, 6):  # an update at step 3
        opt.zero_grad()
        F.cross_entropy(m(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)),
                        torch.randint(10, (8,))).backward()
        opt.step()
        if step == 2:  # before any topology change: the cached float32 mask must not be used
            assert {sp.mask_view().dtype for sp in s.params.values()} == {torch.float64}
    assert len(s.events) == 1 and all(not sp.off_mask_nonzero() for sp in s.params.values())


# ---- 5: the torch floor -------------------------------------------------------------------------
def test_torch_floor_has_nonzero_static_on_cuda():
    floor = re.search(r'^\s*"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 6)  # torch.nonzero_static: CUDA kernel from 2.6


# ---- 6: SNFS's momentum on the weights' device after a load --------------------------------------
def test_snfs_momentum_lands_on_the_weights_device_after_load():
    torch.manual_seed(0)
    m = convnet()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    s = Sparsifier(m, opt, policy=SNFS(when=Periodic(50)), densities=0.3, total_steps=100)
    steps(m, opt, s, 2)
    state = s.state_dict()  # on the CPU, as a checkpoint read with map_location="cpu" is
    opt.zero_grad()
    to_meta(m)  # the weights now live elsewhere (a CPU->CUDA resume)
    s.policy.load_state_dict(state["policy"])
    assert {t.device.type for t in s.policy.momentum.values()} == {"meta"}


# ---- 7: DeepR on a fake GPU: every step (its update included) without a host sync ---------------
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("new_weights", ["zero", "initial"])
def test_steps_on_a_fake_cuda_device(name, new_weights):
    """Under ``FakeTensorMode`` a CUDA tensor meeting a CPU one raises, and so does any op whose
    result the host must read (``.item()``, ``.tolist()``, ``nonzero``, boolean indexing): four
    steps with the explicit calls (the fake device has no autograd engine, so gradients are
    given) run no such op, DeepR's four topology changes included."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = convnet("cuda")
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        s = Sparsifier(m, opt, policy=POLICIES[name](), densities=0.3, init="random", total_steps=100,
                       hooks=False, new_weights=new_weights)
        for _ in range(4):
            opt.zero_grad()
            m(torch.randn(4, 3, 8, 8, device="cuda"))
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            s.before_optimizer_step()
            opt.step()
            s.step()
        assert {sp.mask.device.type for sp in s.params.values()} == {"cuda"}
    assert s.step_count == 4


@pytest.mark.parametrize("density", [0.04, 0.6])  # few from many (draws with rejection); fuller than free
def test_deepr_grows_as_many_as_it_drops_when_every_sign_flips(density):
    topologies = []
    for backend in ("masked", "csr"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(50, 20))
        s = Sparsifier(m, None, policy=DeepR(), densities=density, backend=backend, hooks=False, seed=1,
                       new_weights="initial")
        sp = s.params["0.weight"]
        active = sp.num_active
        with torch.no_grad():
            sp.param.neg_()  # every active weight changes sign
        s.step()
        assert sp.num_active == active and s.totals()["total_pruned"] == s.totals()["total_grown"]
        assert s.totals()["total_pruned"] == min(active, sp.num_free)  # the first flips, as many as fit
        dense = sp.masked_weight()
        assert int(dense.ne(0).sum()) == active  # new entries got N(0, std) weights, dropped ones zero
        topologies.append(dense)
    torch.testing.assert_close(topologies[0], topologies[1])


# ---- 9: CSR is refused off the CPU; the masked path compiles to one graph -----------------------
def test_csr_is_refused_off_the_cpu():
    torch.manual_seed(0)
    m = MnistMLP(hidden_sizes=(30, 20)).to("meta")
    with pytest.raises(DynsparseError, match="CSR backend runs on the CPU only") as e:
        Sparsifier(m, None, policy=SET(), densities=0.3, backend="csr", init="random")
    assert "\n" not in str(e.value)
    # the wide MLP built directly in CSR form (--sparse-backend auto), then moved to the device
    wide = MnistMLP(hidden_sizes=(30, 20), sparse_density=0.3).to("meta")
    with pytest.raises(DynsparseError, match="CSR backend runs on the CPU only"):
        Sparsifier(wide, None, policy=SET(), densities=0.3, backend="auto", batch_size=128)
    # built on the CPU, moved afterwards: refused at the next step
    m = MnistMLP(hidden_sizes=(30, 20))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = Sparsifier(m, opt, policy=SET(), densities=0.3, backend="csr")
    m.to("meta")
    with pytest.raises(DynsparseError, match="CSR backend runs on the CPU only"):
        s.before_optimizer_step()


def compiled_graphs(backend: str, steps: int) -> tuple[int, int, int]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    s = Sparsifier(m, opt, policy=RigL(0.3, when=Periodic(2)), densities=0.5, total_steps=10, backend=backend)
    compiled = torch.compile(m, backend="eager")  # dynamo's graph capture only: cheap
    try:
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(compiled(torch.randn(8, 12)), torch.randint(4, (8,))).backward()
            opt.step()
        counters = torch._dynamo.utils.counters
        return len(s.events), counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()


def test_masked_model_compiles_to_one_graph_across_topology_changes():
    assert compiled_graphs("masked", 9) == (4, 1, 0)  # four changes, one graph, no break


@pytest.mark.slow  # ~8 s of recompiling
def test_compiled_csr_breaks_the_graph_and_recompiles_at_changes():
    """What docs/truly_sparse.md says: use the masked backend with --compile."""
    changes, graphs, breaks = compiled_graphs("csr", 5)
    assert changes == 2 and graphs > changes and breaks > 0


# ---- 10: LOCAL_RANK among the visible GPUs; global pooling as a mean -----------------------------
def test_local_rank_maps_onto_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no process group started
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES: one GPU per rank
    assert distributed.setup("cuda")[1] == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # every rank sees the node's 4 GPUs
    assert distributed.setup("cuda")[1] == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # 4 ranks on 2 visible GPUs
    assert distributed.setup("auto")[1] == torch.device("cuda", 1)


@pytest.mark.parametrize("build,size", [(lambda: WideResNet(10, 1.0), 16), (lambda: ResNet50(0.25, 10), 32)])
def test_global_pooling_is_a_mean_with_the_same_numbers(monkeypatch, build, size):
    """``adaptive_avg_pool2d``'s backward has no deterministic CUDA kernel; ``mean((2, 3))``
    gives the same numbers (bit for bit here) and has one."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, size, size)
    pooled = {}
    model.fc.register_forward_hook(lambda mod, inp, out: pooled.setdefault("x", inp[0]))
    real = F.adaptive_avg_pool2d
    features = {}
    last = list(model.children())[-2] if isinstance(model, ResNet50) else model.bn1
    last.register_forward_hook(lambda mod, inp, out: features.setdefault("x", out))
    monkeypatch.setattr(F, "adaptive_avg_pool2d", lambda *a, **k: pytest.fail("adaptive_avg_pool2d used"))
    model(x).sum()
    feat = features["x"] if isinstance(model, ResNet50) else F.relu(features["x"])
    assert torch.equal(pooled["x"], real(feat, 1).flatten(1))
