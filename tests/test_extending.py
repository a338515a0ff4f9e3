"""A new method is one class and one registry line: MEST, the worked example of docs/extending.md."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dynsparse import MEST, Periodic, Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.legacy import METHODS, Method, method_of, register_method
from dynsparse.sparse import DropGrow, keep_one


def test_mest_drops_by_magnitude_plus_gradient_and_grows_at_random():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():  # the mask: these nonzeros
        model[0].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0, 0, 0, 0]).view(2, 4))
    s = Sparsifier(model, None, policy=MEST(fraction=0.5, lam=1.0, when=Periodic(1)), init="from_weights")
    sp = s.params["0.weight"]
    # |w| + |g| = 0.1+0.5, 0.2+0.0, 0.3+0.0, 0.4+0.0: the two smallest are positions 1 and 2,
    # where magnitude alone would drop 0 and 1
    model[0].weight.grad = torch.tensor([0.5, 0.0, 0.0, 0.0, 9, 9, 9, 9]).view(2, 4)
    s.before_optimizer_step()
    s.step()
    m = sp.topology().view(-1).tolist()
    assert m[:4] == [True, False, False, True] and sum(m[4:]) == 2  # two grown among the free four
    assert s.total_pruned == s.total_grown == 2


def test_mest_from_the_command_line(tiny_mnist, tmp_path):
    from dynsparse.cli import parse_train_args
    from dynsparse.run import run_training
    cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "--epochs", "1", "-b", "16",
                               "--initial-sparsity-fc", "0.9", "--mest", "--drop-fraction", "0.2", "--update-period",
                               "2", "--no-progress"])
    assert method_of(cfg) == "mest" == method_of(parse_train_args(["--method", "mest"])[0])
    summary = run_training(cfg)
    assert summary["method"] == "mest" and summary["total_pruned"] == summary["total_grown"] > 0
    with pytest.raises(DynsparseError, match="--rewire and --method mest are different methods"):
        parse_train_args(["--mest", "--rewire"])
    with pytest.raises(DynsparseError, match="unknown method 'nope'; valid choices: .*mest"):
        parse_train_args(["--method", "nope"])


def test_a_user_method_registered_at_run_time(tiny_mnist, tmp_path):
    class DropLargest(DropGrow):  # a deliberately odd rule, to see the seams used
        def drop_count(self, s, sp):
            return keep_one(sp.num_active, 3)

        def drop_scores(self, s, sp):
            return -sp.magnitude()

    try:
        register_method(Method("droplargest", lambda cfg, ctx: DropLargest(when=ctx.periodic()),
                               options=("update_period",)))
        from dynsparse.cli import parse_train_args
        from dynsparse.run import run_training
        cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "--epochs", "1",
                                   "-b", "16", "--initial-sparsity-fc", "0.9", "--method", "droplargest",
                                   "--update-period", "2", "--no-progress"])
        summary = run_training(cfg)
        assert summary["reallocations"] == 2  # steps 2 and 4 of one 4-step epoch
        assert summary["method"] == "droplargest" and summary["total_pruned"] == 3 * 3 * summary["reallocations"]
    finally:
        METHODS.pop("droplargest", None)


def test_method_by_name_only_where_it_means_one_thing():
    from dynsparse.cli import parse_train_args
    # dense, tied and prune need their own flags (a --method dense run would have been static sparse)
    for name in ("dense", "tied", "prune"):
        with pytest.raises(DynsparseError, match=f"unknown method '{name}'; valid choices: deepr, dsr, mest"):
            parse_train_args(["--method", name])
    with pytest.raises(DynsparseError, match="--drop-fraction is for mest, rigl, snfs, not set"):
        parse_train_args(["--rewire", "--drop-fraction", "0.2"])
    assert method_of(parse_train_args(["--method", "static"])[0]) == "static"
