"""The policy contract: an abstract base, a Context instead of the sparsifier, declared signals,
RigL and MEST as SET with one step overridden, the caller's policy never written to."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dynsparse
from dynsparse.sparse import MEST, SET, SNFS, DropGrow, Periodic, Policy, RigL, Sparsifier
from dynsparse.sparse.policy import Context, Needs


def one_layer(n_in=4, n_out=2):
    return nn.Sequential(nn.Linear(n_in, n_out, bias=False))


def test_policy_is_an_abstract_base_and_dropgrow_needs_a_drop_rule():
    with pytest.raises(TypeError):
        Policy()

    class NoUpdate(Policy):
        pass
    with pytest.raises(TypeError):
        NoUpdate()

    class NoDropRule(DropGrow):  # would have dropped nothing, silently
        pass
    with pytest.raises(TypeError, match="must override drop_count"):
        NoDropRule()


def test_rigl_is_set_with_only_its_grow_scores_and_schedule_default():
    assert issubclass(RigL, SET) and issubclass(MEST, SET) and issubclass(SNFS, RigL)
    def own(cls):
        return {k for k in vars(cls) if not k.startswith("_") or k == "__init__"}
    assert own(RigL) == {"__init__", "needs", "grow_scores"}  # __init__: the paper's defaults
    assert own(MEST) == {"__init__", "needs", "drop_scores"}
    assert RigL().extra == 0 and SET().extra == 1 and MEST().extra == 0
    assert RigL().when == Periodic(100, end_fraction=0.75) and RigL.needs == Needs("grad_scores", at="update")


@pytest.mark.parametrize("extra, expected", [(1, 3), (0, 2)])
def test_sets_extra_entry_in_the_drop_count_is_a_parameter(extra, expected):
    model = one_layer()
    s = Sparsifier(model, None, policy=SET(0.5, when=Periodic(1), extra=extra), densities={"0.weight": 0.5})
    assert s.params["0.weight"].num_active == 4
    s.step()  # step 1 is an update: int(0.5 * 4) + extra dropped, as many regrown
    assert s.total_pruned == s.total_grown == expected


def test_a_policy_is_handed_a_context_never_the_sparsifier():
    seen = []

    class Spy(SET):
        needs = Needs("dense_grad", at="step")

        def attach(self, ctx):
            seen.append(("attach", ctx))

        def before_optimizer_step(self, ctx):
            seen.append(("before", ctx, dict(ctx.signals)))

        def update(self, ctx):
            seen.append(("update", ctx))
            return super().update(ctx)

    model = one_layer()
    s = Sparsifier(model, None, policy=Spy(0.25, when=Periodic(1)), densities={"0.weight": 0.5})
    model[0].weight.grad = torch.ones(2, 4)
    s.before_optimizer_step()
    s.step()
    assert [e[0] for e in seen] == ["attach", "before", "update"]
    for _, ctx, *_ in seen:
        assert type(ctx) is Context and not isinstance(ctx, Sparsifier) and not hasattr(ctx, "optimizer")
        assert ctx.params is s.params and ctx.generator is s.generator
    assert set(seen[1][2]) == {"0.weight"}  # the declared signal, gathered for the hook
    assert seen[2][1].step == 1 and seen[2][1].signals == {}  # an every-step signal is not held on to


def test_rigl_leaves_a_tensor_without_gradient_alone():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    s = Sparsifier(model, None, policy=RigL(0.5, when=Periodic(1, end_step=10)), densities=0.5)
    masks = {n: sp.mask.clone() for n, sp in s.params.items()}
    model[0].weight.grad = torch.ones(4, 4)  # layer 1 got no gradient
    s.before_optimizer_step()
    s.step()
    assert torch.equal(s.params["1.weight"].mask, masks["1.weight"])
    # int(0.5 / 2 (1 + cos(pi / 10)) * 8) = 3 dropped and grown in layer 0 alone
    assert not torch.equal(s.params["0.weight"].mask, masks["0.weight"]) and s.total_pruned == s.total_grown == 3


@pytest.mark.parametrize("make", [lambda: RigL(when=Periodic(4, end_fraction=0.75)), SNFS, MEST, SET])
def test_the_callers_policy_object_is_never_modified(make):
    policy = make()
    before = copy.deepcopy(vars(policy))
    model = one_layer(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=policy, densities=0.5, total_steps=40)
    assert vars(policy).keys() >= before.keys() and policy.when == before["when"]
    assert s.when.end_step is not None or before["when"].end_fraction is None


def test_the_next_step_being_an_update_is_decided_in_one_place():
    engine = Path(dynsparse.__file__).parent / "sparse"
    asks = re.compile(r"\.due\([^)]*\+ 1")  # when.due(step + 1, ...): is the coming step an update?
    where = sorted(p.name for p in engine.rglob("*.py") if asks.search(p.read_text()))
    assert where == ["sparsifier.py"] and len(asks.findall((engine / "sparsifier.py").read_text())) == 1
