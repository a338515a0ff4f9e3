"""The library API of issue 15: each of its six failures, as a test that failed on the old
behaviour (said in each section) and passes now, plus the invariants the hooks must keep."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from dynsparse import DSR, MEST, SET, SNFS, DeepR, Periodic, RigL, Sparsifier, Static
from dynsparse.errors import DynsparseError
from dynsparse.sparse import erk_densities


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def batches(n, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 20, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def off_mask_nonzero(s) -> int:
    return sum(int((sp.param.detach() * sp.inverse_mask_view()).ne(0).sum()) for sp in s.params.values())


def plain_loop(model, opt, data, micro=1, clip=None):
    """What a user writes: no sparsifier call anywhere."""
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(model(xs), ys) / micro).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def summary_rows(table: str) -> dict[str, list[str]]:
    """``Sparsifier.summary()``'s rows by their first column (columns are 2+ spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in table.splitlines()[1:] if not line.startswith("-")]
    return {r[0]: r for r in rows}


def explicit_loop(model, opt, s, data, micro=1):
    """The old API's loop, gradients accumulated densely and masked by the explicit call."""
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            (nn.functional.cross_entropy(model(xs), ys) / micro).backward()
        s.before_optimizer_step()
        opt.step()
        s.step()


POLICIES = {"dsr": lambda: DSR(n_prune=40, when=Periodic(3)), "set": lambda: SET(0.2, when=Periodic(3)),
            "rigl": lambda: RigL(0.3, when=Periodic(3, end_step=20)),
            "snfs": lambda: SNFS(0.5, when=Periodic(3, end_step=20)),
            "deepr": lambda: DeepR(0.01, temperature=lambda e: 1e-4), "mest": lambda: MEST(0.3, when=Periodic(3))}


# ---- 1. forgetting before_optimizer_step() left the model dense ------------------------------
# Old: only the explicit before_optimizer_step() masked gradients; a loop with just
# optimizer.step() (AdamW) made every off-mask weight nonzero while num_active_weights() still
# reported the budget, and nothing raised.

def test_a_loop_with_only_optimizer_step_is_sparse():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = Sparsifier(model, opt, policy=DSR(n_prune=40, when=Periodic(2)), densities=0.1)
    plain_loop(model, opt, batches(6))
    assert off_mask_nonzero(s) == 0
    assert s.step_count == 6 and len(s.drain_events()) == 3
    assert s.num_nonzero_weights() <= s.num_active_weights()


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("micro", [1, 2])
def test_hooks_alone_and_explicit_calls_train_bit_identically(name, micro):
    # the hooks (gradients masked per micro-batch, the dense gradient set aside for RigL/SNFS)
    # reproduce the explicit API exactly; explicit calls next to the hooks change nothing
    runs = {}
    for mode in ("explicit", "hooks", "both"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        s = Sparsifier(model, opt, policy=POLICIES[name](), densities=0.2, hooks=mode != "explicit")
        (plain_loop(model, opt, batches(9), micro) if mode == "hooks"
         else explicit_loop(model, opt, s, batches(9), micro))
        runs[mode] = (model.state_dict(), s.state_dict(), s.totals())
    ref = runs["explicit"]
    assert ref[2]["total_pruned"] > 0
    for mode in ("hooks", "both"):
        sd, ss, totals = runs[mode]
        assert totals == ref[2] and ss["step_count"] == ref[1]["step_count"] == 9
        assert all(torch.equal(sd[k], ref[0][k]) for k in sd), mode
        assert all(torch.equal(ss["masks"][k], ref[1]["masks"][k]) for k in ss["masks"]), mode


def test_weights_changed_behind_the_sparsifier_raise_at_the_next_update():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _s = Sparsifier(model, opt, policy=SET(0.2, when=Periodic(4)), densities=0.2)  # works through its hooks
    plain_loop(model, opt, batches(2))
    with torch.no_grad():
        model[0].weight.add_(0.01)  # e.g. a second optimizer that the sparsifier does not know
    plain_loop(model, opt, batches(1))  # step 3: no update due, nothing checked
    with pytest.raises(DynsparseError, match="nonzero off the mask before step 4"):
        plain_loop(model, opt, batches(1))


def test_dense_weights_loaded_after_building_raise_at_the_first_step():
    model = mlp()
    dense = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Sparsifier(model, opt, policy=Static(), densities=0.2)
    model.load_state_dict(dense)  # behind its back: the masks no longer hold
    with pytest.raises(DynsparseError, match="load_state_dict"):
        plain_loop(model, opt, batches(1))


def test_remove_hooks_detaches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=Static(), densities=0.2)
    s.remove_hooks()
    plain_loop(model, opt, batches(2))
    assert s.step_count == 0 and off_mask_nonzero(s) > 0


# ---- 2. loading weights before building the sparsifier wiped them ----------------------------
# Old: Sparsifier() always drew fresh random masks and zeroed the loaded weights off them; there
# was no init= and nothing said which order was right.

def trained(seed=0):
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=DSR(n_prune=40, when=Periodic(2)), densities=0.2, seed=seed)
    plain_loop(model, opt, batches(5))
    return copy.deepcopy(model.state_dict()), copy.deepcopy(s.state_dict())


def test_weights_loaded_before_building_are_kept():
    weights, state = trained()
    model = mlp(seed=5)
    model.load_state_dict(weights)
    s = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=DSR(n_prune=40), densities=0.2, seed=3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())  # nothing erased
    assert s.num_active_weights() >= sum(int(w.ne(0).sum()) for w in weights.values() if w.dim() == 2)
    s.load_state_dict(state)  # and the exact masks, counters and threshold
    assert all(torch.equal(s.params[k].mask, m) for k, m in state["masks"].items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_init_from_weights_takes_masks_from_the_nonzeros():
    weights, _ = trained()
    model = mlp(seed=5)
    model.load_state_dict(weights)
    s = Sparsifier(model, None, policy=Static(), init="from_weights")
    for name, sp in s.params.items():
        assert torch.equal(sp.mask, weights[name].ne(0))
    with pytest.raises(DynsparseError, match="from_weights"):
        Sparsifier(model, None, policy=Static(), densities=0.1, init="from_weights")


@pytest.mark.parametrize("order", ["model first", "sparsifier first"])
def test_checkpoint_loads_in_either_order_after_building(order):
    weights, state = trained()
    model = mlp(seed=5)
    s = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=DSR(n_prune=40), densities=0.2, seed=3)
    loads = [lambda: model.load_state_dict(weights), lambda: s.load_state_dict(state)]
    for load in (loads if order == "model first" else loads[::-1]):
        load()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(torch.equal(s.params[k].mask, m) for k, m in state["masks"].items())
    assert s.step_count == 5 and s.policy.threshold == state["policy"]["threshold"]


# ---- 3. selection: attention in-projections skipped, tied weights by declaration order --------
# Old: only conv/linear ``weight``s were taken (MultiheadAttention.in_proj_weight and nn.Bilinear
# skipped), a tied embedding/head was sparse or dense depending on which module came first, and
# there was no include/exclude, no summary and no budget by name.

class Custom(nn.Module):
    sparse_weights = ("w",)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.ones(8, 8))  # not declared: stays dense


class Lm(nn.Module):
    def __init__(self, head_first: bool):
        super().__init__()
        head, embed = nn.Linear(8, 30, bias=False), nn.Embedding(30, 8)
        if head_first:
            self.head, self.embed = head, embed
        else:
            self.embed, self.head = embed, head
        self.head.weight = self.embed.weight
        self.attn = nn.MultiheadAttention(8, 2)
        self.bil = nn.Bilinear(8, 8, 4)
        self.custom = Custom()
        self.norm = nn.LayerNorm(8)


@pytest.mark.parametrize("head_first", [False, True])
def test_default_selection_takes_every_matrix_weight_and_tied_ones_once(head_first):
    model = Lm(head_first)
    s = Sparsifier(model, None, policy=Static(), densities=0.5)
    tied = "head.weight" if head_first else "embed.weight"
    assert sorted(s.params) == sorted([tied, "attn.in_proj_weight", "attn.out_proj.weight", "bil.weight", "custom.w"])
    rows = summary_rows(s.summary())
    tied_row = rows["head.weight = embed.weight" if head_first else "embed.weight = head.weight"]
    assert tied_row[1:3] == ["30x8", "0.5000"]
    assert rows["attn.in_proj_weight"][1:5] == ["24x8", "0.5000", "192", "96"]


def test_include_exclude_by_pattern_and_type():
    model = Lm(False)
    s = Sparsifier(model, None, policy=Static(), densities=0.5, exclude=["attn.*", nn.Bilinear])
    assert sorted(s.params) == ["custom.w", "embed.weight"]
    s = Sparsifier(model, None, policy=Static(), densities=0.5, include=[nn.MultiheadAttention])
    assert sorted(s.params) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    with pytest.raises(DynsparseError, match="exclude 'atn.\\*' matches no candidate"):
        Sparsifier(model, None, policy=Static(), densities=0.5, exclude="atn.*")


def test_budget_by_name_from_the_models_own_shapes():
    model = Lm(False)
    s = Sparsifier(model, None, policy=Static(), densities="erk", density=0.3)
    params = dict(model.named_parameters())
    expected = erk_densities({n: tuple(params[n].shape) for n in s.params}, 0.3)
    for n, sp in s.params.items():
        assert sp.num_active == int(expected[n] * sp.num_entries + 0.1)
    with pytest.raises(DynsparseError, match="pass density="):
        Sparsifier(model, None, policy=Static(), densities="erk")


# ---- 4. clipping measured off-mask gradients; accumulation; AMP ------------------------------
# Old: gradients stayed dense until the explicit before_optimizer_step(), so a clip between
# backward and that call measured off-mask gradients too; no optimizer hook existed, so a step
# skipped by GradScaler was counted by the loop's explicit step().

def test_clipping_sees_masked_gradients():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=Static(), densities=0.1)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(int((sp.param.grad * sp.inverse_mask_view()).ne(0).sum()) == 0 for sp in s.params.values())
    masked_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) == masked_norm


@pytest.mark.parametrize("name", ["rigl", "snfs"])
def test_gradscaler_and_clipping_keep_the_dense_gradient_in_true_units(name):
    # a power-of-two loss scale makes the scaled run's gradients exactly the unscaled run's
    results = []
    for scaled in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = Sparsifier(model, opt, policy=POLICIES[name](), densities=0.2)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        for x, y in batches(6):
            opt.zero_grad()
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        assert s.step_count == 6 and s.totals()["total_pruned"] > 0
        results.append((s.state_dict(), getattr(s.policy, "momentum", {})))
    (a, ma), (b, mb) = results
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert all(torch.allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7) for k in ma)


def test_a_step_skipped_by_gradscaler_is_not_counted():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=Static(), densities=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if i == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        s.step()  # an explicit call, as old loops have: harmless, and not a step when skipped
    assert s.step_count == 2 and off_mask_nonzero(s) == 0


# ---- 5. imports and one time unit ------------------------------------------------------------
# Old: RigL, SNFS, GradualPruning and make_densities were not top-level (fixed by the engine
# refactor); RigL's default end_step was 10**9 (never stopped) and there was no total_steps.

def test_everything_the_readme_names_imports_from_the_top():
    from dynsparse import GradualPruning, make_densities  # (RigL, SNFS, MEST above)
    shapes = {n: tuple(p.shape) for n, p in mlp().named_parameters() if p.dim() == 2}
    dens = make_densities("erk", shapes, 0.2)
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    kept = sum(dens[n] * sizes[n] for n in shapes) / sum(sizes.values())
    assert kept == pytest.approx(0.2, abs=1e-3) and len(set(dens.values())) > 1  # ERK: the total, spread unevenly
    with pytest.raises(DynsparseError):
        GradualPruning({"0.weight": 1.0})  # a target sparsity of 1 would prune everything


def test_rigl_ends_at_three_quarters_of_total_steps_without_set_epoch():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = RigL(when=Periodic(4, end_fraction=0.75))
    s = Sparsifier(model, opt, policy=policy, densities=0.2, total_steps=40)
    assert RigL().when.end_fraction == 0.75 and s.when.end_step == 30
    # the sparsifier resolves the schedule into its own copy: the caller's policy is not written to
    assert policy.when == Periodic(4, end_fraction=0.75) and policy.when.end_step is None
    plain_loop(model, opt, batches(40))
    assert [e.step for e in s.drain_events()] == [4, 8, 12, 16, 20, 24, 28]


def test_an_end_at_a_fraction_of_unknown_training_is_an_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DynsparseError, match="pass total_steps="):
        Sparsifier(model, opt, policy=SNFS(), densities=0.2)
    s = Sparsifier(model, None, policy=RigL(), densities=0.2)  # no optimizer to attach to: at the first step
    with pytest.raises(DynsparseError, match="pass total_steps="):
        explicit_loop(model, opt, s, batches(1))


# ---- 6. export and honest accounting ---------------------------------------------------------
# Old: no export() or sparse tensors; counts were mask entries only, though DSR regrows at zero;
# and the topology changed on the very last step.

def test_nonzero_counts_differ_from_mask_entries_after_regrowth_at_zero():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=DSR(n_prune=40, when=Periodic(3)), densities=0.2)
    plain_loop(model, opt, batches(3))  # an update at step 3 grows new entries at zero
    grown = s.totals()["total_grown"]
    assert grown > 0 and s.num_nonzero_weights() == s.num_active_weights() - grown
    counts = s.param_counts()
    assert counts["sparse_nonzero"] == s.num_nonzero_weights() < counts["sparse"]
    total = summary_rows(s.summary())["sparse tensors"]
    assert total[3:5] == [str(s.num_active_weights()), str(s.num_nonzero_weights())]


def test_export_is_a_plain_masked_state_dict_and_sparse_tensors():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    s = Sparsifier(model, opt, policy=SET(0.2, when=Periodic(2)), densities=0.2)
    plain_loop(model, opt, batches(5))
    out = s.export()
    assert set(out) == set(model.state_dict()) and all(type(v) is torch.Tensor for v in out.values())
    plain = mlp(seed=9)
    plain.load_state_dict(out)  # no dynsparse object needed
    for name, sp in s.params.items():
        w = dict(plain.named_parameters())[name].detach()
        assert torch.equal(w, sp.param.detach()) and int((w * sp.inverse_mask_view()).ne(0).sum()) == 0
    coo, csr = s.sparse_tensors(), s.sparse_tensors(torch.sparse_csr)
    assert sum(t._nnz() for t in coo.values()) == s.num_nonzero_weights()
    assert all(torch.equal(csr[n].to_dense(), s.params[n].param.detach()) for n in s.params)


def test_no_topology_change_on_the_last_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = Sparsifier(model, opt, policy=DSR(n_prune=40, when=Periodic(5)), densities=0.2, total_steps=10)
    plain_loop(model, opt, batches(10))
    assert [e.step for e in s.drain_events()] == [5]  # not 10: what it grew would never train


def test_run_summary_counts_true_nonzeros_beside_mask_entries(tiny_mnist, tmp_path):
    # issue 15 item 6: params_nonzero counted mask entries; DSR regrows at zero, so after an update
    # on the last step some learnable entries are still exactly zero
    from dynsparse.cli.flags import parse_train_args
    from dynsparse.training.run import run_training
    schedule = tmp_path / "every4.yaml"
    schedule.write_text("lr_schedule:\n  - 0 : 0.1\nrewire_period_schedule:\n  - 0 : 4\n")
    cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "--epochs", "1", "-b", "16",
                               "--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune", "--rewire-scaling",
                               "--schedule-file", str(schedule), "--no-progress"])
    s = run_training(cfg)
    assert s["reallocations"] == 1 and s["total_grown"] > 0
    assert s["params_learnable"] == s["params_fixed"] + s["params_sparse"]
    assert s["params_nonzero"] < s["params_learnable"]  # DSR's update at step 4 (the last) grew zeros
