"""The original command line: every job line of the original lists parses, flags mean what they say."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynsparse.cli.commands import main, parse_train_args
from dynsparse.errors import DynsparseError
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import method_of

REPO = Path(__file__).resolve().parents[1]
ORIGINAL = REPO.parent / "shared" / "reference" / "original" / "experiments"
BUNDLED_LISTS = REPO / "experiments" / "original"


def job_lines() -> list[str]:
    files = sorted(BUNDLED_LISTS.glob("*.yaml"))
    lines = []
    for f in files:
        for job in yaml.safe_load(f.read_text())["jobs"]:
            lines.append(job)
    return lines


def test_bundled_lists_are_the_original_files_unchanged():
    if not ORIGINAL.is_dir():
        pytest.skip("../shared/reference/original not beside the checkout")
    for f in ORIGINAL.glob("*.yaml"):
        assert (BUNDLED_LISTS / f.name).read_bytes() == f.read_bytes()


def test_every_original_job_line_parses():
    lines = job_lines()
    assert len(lines) == 104
    methods = set()
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["python", "main.py"]
        cfg, _ = parse_train_args(argv[2:])
        assert cfg.model in ("cifar10_WideResNet", "imagenet_resnet50")
        assert cfg.schedule_file.endswith(".yaml")
        methods.add(method_of(cfg))
    assert methods == {"dense", "static", "dsr", "set", "deepr", "prune", "tied"}


def test_split_schedule_path_of_job_68_is_joined():
    line = next(ln for ln in job_lines() if "learning_schedules/ wrnet" in ln)
    cfg, _ = parse_train_args(shlex.split(line)[2:])
    # joined, then resolved to the bundled copy that a run uses (issue 23: the file used is recorded)
    assert cfg.schedule_file.endswith("learning_schedules/wrnet_schedule.yaml") and Path(cfg.schedule_file).is_file()


def test_original_defaults_and_values():
    cfg, dry = parse_train_args([])
    assert cfg == TrainConfig() and not dry
    assert (cfg.DeepR_eta, cfg.sub_kernel_granularity, cfg.nesterov, cfg.print_freq) == (0.001, 2, True, 50)
    cfg, _ = parse_train_args(["--nesterov", "False", "--wd", "5e-4", "-b", "64", "--DeepR_eta", "0.01",
                               "--widen-factor", "0.75", "-j", "3", "--L1-loss-coeff", "1e-5"])
    assert cfg.nesterov is False and cfg.weight_decay == 5e-4 and cfg.batch_size == 64
    assert cfg.DeepR_eta == 0.01 and cfg.widen_factor == 0.75 and cfg.workers == 3 and cfg.L1_loss_coeff == 1e-5


@pytest.mark.parametrize("flags,method", [
    (["--initial-sparsity-fc", "0", "--initial-sparsity-conv", "0"], "dense"),
    ([], "static"),
    (["--prune"], "prune"),
    (["--tied"], "tied"),
    (["--rewire", "--threshold-prune", "--rewire-scaling"], "dsr"),
    (["--rewire"], "set"),
    (["--DeepR"], "deepr"),
])
def test_method_selection(flags, method):
    assert method_of(parse_train_args(flags)[0]) == method


@pytest.mark.parametrize("flags,needle", [
    (["--initial-sparsity-fc", "1.0"], "--initial-sparsity-fc must be in [0, 1)"),
    (["--initial-sparsity-conv", "-0.1"], "--initial-sparsity-conv must be in [0, 1)"),
    (["--sub-kernel-granularity", "5"], "--sub-kernel-granularity must be 1, 2, 3 or 4"),
    (["--DeepR", "--rewire"], "--DeepR and --rewire are different methods"),
    (["--rewire-scaling"], "--rewire-scaling needs --rewire"),
    (["--epochs", "0"], "--epochs >= 1"),
    (["--prune", "--rewire"], "--rewire and --prune are different methods"),
    (["--rescale-tied-gradient"], "--rescale-tied-gradient needs --tied"),
    (["--prune", "--prune-target-sparsity-fc", "1"], "--prune-target-sparsity-fc must be in [0, 1)"),
    (["--tied", "--copy-mask-from", "runs/x"], "does not combine with --tied"),
    (["--n-prune-params", "0", "--rewire", "--threshold-prune"], "--n-prune-params must be >= 1"),
])
def test_bad_flags_give_clear_errors(flags, needle):
    with pytest.raises(DynsparseError, match=None) as e:
        parse_train_args(flags)
    assert needle in str(e.value)


def test_cli_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "--model", "resnet9000", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet9000'" in err and "cifar10_WideResNet, imagenet_resnet50, mnist_mlp" in err
    code = main(["train", "--initial-sparsity-fc", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("dynsparse: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_main_py_dry_run_subprocess(tiny_cifar):
    proc = subprocess.run([sys.executable, "main.py", "--model", "cifar10_WideResNet", "--widen-factor", "2",
                           "--rewire", "--threshold-prune", "--rewire-scaling", "--dry-run", "--data", str(tiny_cifar)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "method       dsr" in proc.stdout and "widen_factor=2.0" in proc.stdout
    assert "rewire_scaling=True" in proc.stdout and "found" in proc.stdout
