"""A new method is one file with one decorated class (issue 24): MEST, a method in a user's own
module (``--plugin``), and the examples of docs/extending.md, run as written."""
from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynsparse import MEST, Periodic, Sparsifier
from dynsparse.errors import DynsparseError
from dynsparse.sparse import POLICIES, REGISTRY, create_policy
from dynsparse.training.engine_adapter import method_of


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
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.run import run_training
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


def test_method_by_name_only_where_it_means_one_thing():
    from dynsparse.cli.commands import parse_train_args
    # dense, tied and prune need their own flags (a --method dense run would have been static sparse)
    for name in ("dense", "tied", "prune"):
        with pytest.raises(DynsparseError, match=f"unknown method '{name}'; valid choices: deepr, dsr, mest"):
            parse_train_args(["--method", name])
    with pytest.raises(DynsparseError, match="--drop-fraction is for mest, rigl, snfs, not set; set's options: "
                                             "--rewire-fraction, --rewire-scaling$"):
        parse_train_args(["--rewire", "--drop-fraction", "0.2"])
    assert method_of(parse_train_args(["--method", "static"])[0]) == "static"


@pytest.fixture
def registry_restored():
    """Whatever a test registers or imports as a plugin is gone afterwards."""
    from dynsparse.training import method_flags
    saved = dict(REGISTRY), dict(POLICIES), dict(method_flags._LOADED), set(sys.modules)
    yield
    for table, old in zip((REGISTRY, POLICIES, method_flags._LOADED), saved):
        table.clear()
        table.update(old)
    for name in set(sys.modules) - saved[3]:
        if name.startswith(("my_", "doc_")):
            del sys.modules[name]


PLUGIN = """
from dynsparse.sparse import SET, keep_one, register_policy


@register_policy("myset", help="SET dropping my_opt entries per tensor", schedule="periodic-until-end",
                 fields={"fraction": "rewire_fraction"})
class MySET(SET):
    def __init__(self, fraction: float = 0.1, my_opt: int = 2, when=None):
        super().__init__(fraction, when=when)
        self.my_opt = my_opt

    def drop_count(self, ctx, sp):
        return keep_one(sp.num_active, self.my_opt)
"""


def test_a_method_in_a_users_own_module(tiny_mnist, tmp_path, monkeypatch, registry_restored):
    """One file with one decorated class: the library, dynsparse train --plugin, its own flag
    (--my-opt), config.json and resume, and a one-line refusal elsewhere."""
    from dynsparse.cli.commands import main, parse_train_args
    from dynsparse.training.checkpoint import ConfigMismatch
    from dynsparse.training.run import run_training
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)  # the plugin is a module of the current directory
    with pytest.raises(DynsparseError, match="^--plugin nope_no_module: cannot import 'nope_no_module'"):
        parse_train_args(["--plugin", "nope_no_module", "--method", "myset"])
    args = ["--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "-b", "16", "--initial-sparsity-fc",
            "0.9", "--plugin", "my_plugin", "--method", "myset", "--update-period", "1", "--update-end", "1.0",
            "--no-progress", "--name", "mine"]
    assert main(["train", *args, "--epochs", "1", "--my-opt", "3"]) == 0
    saved = json.loads((tmp_path / "runs" / "mine" / "config.json").read_text())
    assert saved["method"] == "myset" and saved["config"]["plugin"] == "my_plugin"
    assert saved["config"]["method_options"] == [["my_opt", 3]]
    summary = json.loads((tmp_path / "runs" / "mine" / "summary.json").read_text())
    # 3 per tensor (the flag, not the default 2), in each of mnist_mlp's 3 sparse layers
    assert summary["reallocations"] >= 2 and summary["total_pruned"] == 3 * 3 * summary["reallocations"]
    # resumed: the option is part of the configuration that must match
    with pytest.raises(ConfigMismatch, match="--method-options"):
        run_training(parse_train_args([*args, "--epochs", "2", "--my-opt", "4", "--resume", "mine"])[0])
    cfg, _ = parse_train_args([*args, "--epochs", "2", "--my-opt", "3", "--resume", "mine"])
    assert run_training(cfg)["total_pruned"] > summary["total_pruned"]
    # the library: the class by name, its option a keyword
    from dynsparse import Periodic, Sparsifier
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    s = Sparsifier(model, None, policy=create_policy("myset", my_opt=5, when=Periodic(1)), densities=0.5)
    model[0].weight.grad = torch.ones(8, 8)
    s.before_optimizer_step()
    s.step()
    assert s.total_pruned == s.total_grown == 5
    # another method refuses the option, naming its own
    with pytest.raises(DynsparseError, match="^--my-opt is for myset, not set; set's options: --rewire-fraction, "
                                             "--rewire-scaling$"):
        parse_train_args(["--plugin", "my_plugin", "--rewire", "--my-opt", "3"])


def test_every_policy_option_is_a_flag_that_reaches_the_policy():
    """MEST's lam and SNFS's beta (no flag before issue 24), DSR's threshold; defaults unchanged."""
    from dynsparse.cli.commands import parse_train_args
    from dynsparse.training.engine_adapter import build_sparsifier
    from dynsparse.training.epoch_schedules import load_schedules

    def policy(argv):
        cfg, _ = parse_train_args(["--initial-sparsity-fc", "0.9", *argv])
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        return build_sparsifier(cfg, model, None, load_schedules(None), 10).policy
    assert policy(["--mest", "--lam", "0.25"]).lam == 0.25 and policy(["--mest"]).lam == 1.0
    assert policy(["--sparse-momentum", "--beta", "0.5"]).beta == 0.5 and policy(["--sparse-momentum"]).beta == 0.9
    assert policy(["--rewire", "--threshold-prune", "--threshold", "0.01"]).threshold == 0.01
    assert policy(["--rigl"]).fraction == 0.3 and policy(["--sparse-momentum"]).fraction == 0.5
    with pytest.raises(DynsparseError, match="^--lam is for mest, not rigl; rigl's options: --drop-fraction, "
                                             "--update-period$"):
        parse_train_args(["--rigl", "--lam", "0.5"])


def test_the_report_orders_methods_as_registered():
    from dynsparse.experiments.report import method_order
    assert method_order() == ["dense", "thin dense", *REGISTRY, "tied"]
    assert list(REGISTRY)[:2] == ["prune", "dsr"] and method_order().index("mest") < method_order().index("tied")


def test_the_original_selector_flags_are_one_table():
    from dynsparse.cli.commands import parse_train_args
    expected = {("--rewire", "--threshold-prune"): "dsr", ("--rewire",): "set", ("--DeepR",): "deepr",
                ("--rigl",): "rigl", ("--sparse-momentum",): "snfs", ("--mest",): "mest", (): "static"}
    for flags, name in expected.items():
        assert method_of(parse_train_args(list(flags))[0]) == name


DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_the_examples_of_docs_extending_run_as_written(tiny_mnist, tmp_path, monkeypatch, registry_restored):
    """Each python block runs (a block whose first line is ``# FILE.py`` is written to that file,
    as a user would); each ``dynsparse train`` line runs for one short epoch on tiny data."""
    from dynsparse.cli.commands import main
    monkeypatch.chdir(tmp_path)
    text = DOC.read_text()
    blocks = re.findall(r"```(python|bash)\n(.*?)```", text, re.S)
    assert sum(kind == "python" for kind, _ in blocks) >= 3 and any("--plugin" in b for _, b in blocks)
    namespace: dict = {}
    for kind, code in blocks:
        if kind == "python":
            first = code.splitlines()[0]
            if re.fullmatch(r"# \w+\.py", first):
                (tmp_path / first[2:]).write_text(code)
            else:
                exec(compile(code, str(DOC), "exec"), namespace)
            continue
        for line in code.replace("\\\n", " ").splitlines():
            if not line.startswith("dynsparse train"):
                continue
            argv = shlex.split(line)[2:]
            argv[argv.index("--data") + 1] = str(tiny_mnist)
            argv[argv.index("--epochs") + 1] = "1"
            argv += ["-b", "16", "--runs-dir", str(tmp_path / "runs"), "--no-progress", "--overwrite"]
            if "--update-period" in argv:
                argv[argv.index("--update-period") + 1] = "1"
            assert main(["train", *argv]) == 0, line
