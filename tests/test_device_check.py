"""Every policy x storage x way of attaching, 100 steps (DeepR 50) under the device checker
(tests/devicecheck.py): no op mixes devices and no host sync happens between topology updates.

On a CPU this proves which ops run, not how fast: a ``.tolist()``, ``nonzero``, ``unique`` or
boolean index between updates would stall a GPU every step, and is caught here by name. What it
cannot see on a CPU (a tensor left on the wrong device) is caught by the runs on ``meta`` and on
a fake CUDA device in tests/test_devices.py. docs/performance.md, "Devices: what is proven on CPU".
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from devicecheck import DeviceCheck
from torch import nn

from dynsparse import Sparsifier
from dynsparse.sparse.policies.deepr import DeepR
from dynsparse.sparse.policies.dsr import DSR
from dynsparse.sparse.policies.mest import MEST
from dynsparse.sparse.policies.pruning import GradualPruning
from dynsparse.sparse.policies.rigl import RigL
from dynsparse.sparse.policies.set import SET
from dynsparse.sparse.policies.snfs import SNFS
from dynsparse.sparse.policies.static import Static
from dynsparse.sparse.when import AtEpochEnds, EveryStep, Periodic

STEPS, EPOCH, PERIOD = 100, 30, 20  # 4 periodic changes, 3 epoch ends; DeepR changes every step: 50

POLICIES = {
    "dsr": lambda: DSR(n_prune=40, when=Periodic(PERIOD)),
    "set": lambda: SET(0.2, when=Periodic(PERIOD)),
    "deepr": lambda: DeepR(eta=0.01, temperature=lambda epoch: 1e-4),
    "rigl": lambda: RigL(0.3, when=Periodic(PERIOD)),
    "snfs": lambda: SNFS(0.3, when=Periodic(PERIOD)),
    "mest": lambda: MEST(0.2, when=Periodic(PERIOD)),
    "static": Static,
    "prune": lambda: GradualPruning({"0.weight": 0.9, "2.weight": 0.8, "4.weight": 0.5}, when=AtEpochEnds(1, 1, 3)),
}


def run_checked(name: str, backend: str, hooks: bool, *, new_weights: str = "zero"):
    steps = STEPS // 2 if name == "deepr" else STEPS
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    policy = POLICIES[name]()
    s = Sparsifier(m, opt, policy=policy, densities=1.0 if name == "prune" else 0.3, backend=backend,
                   hooks=hooks, new_weights=new_weights, total_steps=steps)
    g = torch.Generator().manual_seed(1)
    check = DeviceCheck()
    with check.watching():
        for step in range(steps):
            # DeepR changes the topology every step: on masked storage even that must not sync;
            # CSR storage runs on the CPU only, where its updates may read counts
            due = s.when.due(s.step_count + 1, s.epoch)
            if isinstance(s.when, EveryStep):
                due = backend == "csr"
            with check.update(due or (hooks and step == 0)):  # the first step checks the weights once
                x, y = torch.randn(16, 24, generator=g), torch.randint(10, (16,), generator=g)
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                if not hooks:
                    s.before_optimizer_step()
                opt.step()
                if not hooks:
                    s.step()
            if (step + 1) % EPOCH == 0:
                with check.update():
                    s.end_epoch()
                    s.set_epoch(s.epoch + 1)
    return s, check


@pytest.mark.parametrize("hooks", [True, False], ids=["hooks", "explicit"])
@pytest.mark.parametrize("backend", ["masked", "csr"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_host_sync_and_one_device_between_updates(name, backend, hooks):
    s, check = run_checked(name, backend, hooks)
    assert check.ops > 1000  # the mode really saw the loop
    assert not check.mixed, check.mixed[:5]
    assert not check.syncs, sorted(set(check.syncs))
    assert all(sp.storage == backend for sp in s.params.values())
    totals = s.totals()
    if name != "static":  # the topology really changed (gradual pruning only drops)
        assert totals["total_pruned"] > 0 and totals["total_grown"] == (0 if name == "prune"
                                                                        else totals["total_pruned"])


def test_the_checker_catches_a_sync_and_a_device_mix():
    check = DeviceCheck()
    with check.watching():
        t = torch.arange(6.0)
        t[t > 2] = 0.0  # boolean-mask indexing: its size is data-dependent
        t.sum().item()
        t.tolist()
        torch.nonzero(t)
        with pytest.raises(RuntimeError):  # recorded, then refused by torch itself
            torch.randn(3, device="meta") + torch.randn(3)
    assert len(check.syncs) == 4, check.syncs
    assert len(check.mixed) == 1
    with check.watching(), check.update():
        torch.arange(3).tolist()
    assert len(check.syncs) == 4  # allowed inside an update
