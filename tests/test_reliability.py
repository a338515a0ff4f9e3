"""Issue 12: no run can be mislabeled, no bad input ends in a traceback, every interruption resumes.

Faults are injected with small fakes (see docs/reliability.md): a patched fsync that reports a full
disk, a patched ``mkstemp`` that reports a read-only directory, a loss that turns NaN at a chosen
step, a training epoch that raises KeyboardInterrupt, and a real SIGTERM to a CLI subprocess.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dynsparse.training.loop as train_module
import dynsparse.training.run as run_module
from dynsparse.cli.commands import main, parse_train_args
from dynsparse.data import datasets
from dynsparse.errors import DynsparseError
from dynsparse.experiments.sweep import run_sweep
from dynsparse.training.checkpoint import read_checkpoint
from dynsparse.training.run import run_training

REPO = Path(__file__).resolve().parents[1]


def argv_for(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["--model", "mnist_mlp", "--data", str(data), "--runs-dir", str(runs), "-b", "16", "--epochs", "2",
            "--no-progress", *extra]


def cfg(data: Path, runs: Path, *extra: str):
    return parse_train_args(argv_for(data, runs, *extra))[0]


def one_line_error(capsys, argv: list[str], needle: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.startswith("dynsparse: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, (needle, err)
    return err


def interrupt_epoch(monkeypatch, at_epoch: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Make training raise ``exc`` inside epoch ``at_epoch`` (after its first step), like Ctrl-C."""
    real = train_module.train_one_epoch

    def fake(model, batches, *args, desc="", **kw):
        if desc == f"epoch {at_epoch}":
            raise exc()
        return real(model, batches, *args, desc=desc, **kw)
    monkeypatch.setattr(run_module, "train_one_epoch", fake)


def full_disk(monkeypatch, when) -> None:
    """fsync of a temporary for the file ``when(name, count)`` picks fails with ENOSPC."""
    real, counts = os.fsync, {}

    def fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # .checkpoint.pt.XXXX.tmp
        target = name[1:].rsplit(".", 2)[0] if name.endswith(".tmp") else name
        counts[target] = counts.get(target, 0) + 1
        if when(target, counts[target]):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)


def temporaries(d: Path) -> list[Path]:
    return list(d.glob(".*.tmp"))


# ---- 1. a result never carries the wrong labels ------------------------------------------------

def test_overwrite_removes_every_old_output_before_writing_anything(tiny_mnist, tmp_path, monkeypatch):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "mnist_mlp_0"
    run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.98", "--epochs", "1"))
    (run / ".checkpoint.pt.zz.tmp").write_bytes(b"half")
    (run / "debug_rank1.pt").write_bytes(b"old")
    interrupt_epoch(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.9", "--overwrite"))
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "initial.pt"]  # nothing of the 0.98 run
    monkeypatch.undo()
    with pytest.raises(DynsparseError, match="already holds a run"):
        run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.9"))
    s = run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.9", "--resume", str(run)))
    assert s["sparsity"] == 0.9 and [r["epoch"] for r in s["history"]] == [0, 1]
    assert s["params_sparse"] == int(0.1 * 235200 + 0.1) + int(0.1 * 30000 + 0.1) + int(0.1 * 1000 + 0.1)


def test_resume_refuses_flags_that_change_the_result_and_allows_the_others(tiny_mnist, tmp_path):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "mnist_mlp_0"
    run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.98", "--epochs", "1"))
    before = (run / "checkpoint.pt").read_bytes()
    for extra, needle in ((["--initial-sparsity-fc", "0.9"], "--initial-sparsity-fc 0.98 -> 0.9"),
                          (["--initial-sparsity-fc", "0.98", "--seed", "3", "-b", "32"],
                           "--batch-size 16 -> 32; --seed 0 -> 3"),
                          (["--initial-sparsity-fc", "0.98", "--rewire"], "--rewire False -> True")):
        with pytest.raises(DynsparseError, match="different configuration") as e:
            run_training(cfg(tiny_mnist, runs, *extra, "--resume", str(run)))
        assert needle in str(e.value)
    assert (run / "checkpoint.pt").read_bytes() == before  # a refused resume changes nothing
    # moved runs, another copy of the data, other worker count, longer: allowed
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(run, moved / "mnist_mlp_0")
    data2 = tmp_path / "data2"
    os.rename(tiny_mnist, data2)
    s = run_training(cfg(data2, moved, "--initial-sparsity-fc", "0.98", "--epochs", "3", "-j", "2",
                         "--resume", str(moved / "mnist_mlp_0")))
    assert [r["epoch"] for r in s["history"]] == [0, 1, 2]


def test_sweep_never_resumes_a_job_whose_saved_configuration_differs(tiny_mnist, tmp_path):
    runs = tmp_path / "runs"
    run_training(cfg(tiny_mnist, runs, "--initial-sparsity-fc", "0.98", "--epochs", "1", "--name", "job"))
    (runs / "job" / "summary.json").unlink()  # interrupted: a checkpoint, no summary
    before = {p.name: p.read_bytes() for p in (runs / "job").iterdir()}
    lst = tmp_path / "l.yaml"
    lst.write_text("jobs:\n  - dynsparse train --initial-sparsity-fc 0.9 --name job -b 16 --epochs 2\n")
    calls = []
    out = run_sweep(lst, extra=["--data", str(tiny_mnist), "--runs-dir", str(runs), "--no-progress"],
                    echo=lambda s: None, train=lambda c, a: calls.append(c))
    assert out[0].startswith("failed: ") and "--initial-sparsity-fc 0.98 -> 0.9" in out[0] and calls == []
    assert {p.name: p.read_bytes() for p in (runs / "job").iterdir()} == before


# ---- 2. --prune needs a dense starting point --------------------------------------------------

def test_prune_needs_resume_or_the_explicit_from_scratch_switch(tiny_mnist, tmp_path, capsys):
    prune = ["--prune", "--initial-sparsity-fc", "0", "--prune-target-sparsity-fc", "0.5", "--prune-iterations", "1",
             "--start-pruning-after-epoch", "0", "--post-prune-epochs", "1"]
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, *prune)], "pass --resume DENSE_RUN")
    assert not (tmp_path / "mnist_mlp_0").exists()
    s = run_training(cfg(tiny_mnist, tmp_path, *prune, "--prune-from-scratch"))
    assert s["method"] == "prune" and s["config"]["prune_from_scratch"] is True


# ---- 3. one line and exit 2 instead of a traceback ---------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--lr", "-0.1"], "--lr must be a finite number >= 0, got -0.1"),
    (["--weight-decay", "-0.0001"], "--weight-decay must be a finite number >= 0"),
    (["--momentum", "-1"], "--momentum must be a finite number >= 0, got -1.0"),
])
def test_negative_hyperparameters(tiny_mnist, tmp_path, capsys, extra, needle):
    err = one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, *extra)], needle)
    assert "esterov" not in err


def test_negative_lr_in_a_schedule_file(tiny_mnist, tmp_path, capsys):
    sched = tmp_path / "s.yaml"
    sched.write_text("lr_schedule:\n  - 0 : 0.1\n  - 1 : -0.01\n")
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, "--schedule-file", str(sched))],
                   "lr_schedule values must be finite numbers >= 0, got -0.01")


def test_empty_checkpoint_and_runs_dir_that_is_a_file(tiny_mnist, tmp_path, capsys):
    empty = tmp_path / "r" / "checkpoint.pt"
    empty.parent.mkdir()
    empty.touch()
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, "--resume", str(empty.parent))],
                   "is empty (0 bytes)")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, afile)], f"--runs-dir {afile} is a file")


def test_read_only_runs_dir(tiny_mnist, tmp_path, capsys, monkeypatch):
    import tempfile  # the test runs as root, for whom chmod 0555 does not stop writes: fake it

    def mkstemp(*a, **kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path)], "Permission denied")


def test_full_disk_at_start_and_at_an_epoch_end_checkpoint(tiny_mnist, tmp_path, capsys, monkeypatch):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "mnist_mlp_0"
    full_disk(monkeypatch, lambda name, n: name == "initial.pt")
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, runs)], "No space left on device")
    assert not temporaries(run)
    monkeypatch.undo()
    full_disk(monkeypatch, lambda name, n: name == "checkpoint.pt" and n == 2)  # the end of epoch 1
    err = one_line_error(capsys, ["train", *argv_for(tiny_mnist, runs, "--overwrite")], "No space left on device")
    assert f"--resume {run}" in err and not temporaries(run)
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 1  # the last complete one
    monkeypatch.undo()
    assert main(["train", *argv_for(tiny_mnist, runs, "--resume", str(run))]) == 0


def test_resuming_another_models_run_says_what_does_not_fit(tiny_mnist, tmp_path, capsys):
    run_training(cfg(tiny_mnist, tmp_path, "--epochs", "1", "--no-batch-norm", "--name", "nobn"))
    err = one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, "--epochs", "1", "--resume",
                                                     str(tmp_path / "nobn"))], "does not fit this model")
    assert "--no-batch-norm True -> False" in err and "missing: bn1.weight" in err


def test_flag_typo_in_one_job_of_a_list_is_one_line(tmp_path, capsys):
    lst = tmp_path / "l.yaml"
    lst.write_text("jobs:\n  - python main.py --job-idx 0 --name a\n  - python main.py --job-idx 1 --lrr 0.1\n")
    assert main(["sweep", str(lst), "--dry-run", "--", "--runs-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "usage:" not in captured.err + captured.out
    failed = [ln for ln in captured.out.splitlines() if ln.startswith("  job 1:")]
    assert failed == ["  job 1: failed: unrecognized arguments: --lrr 0.1; did you mean --lr?"]


# ---- 4. every interruption resumes -------------------------------------------------------------

def test_run_interrupted_in_its_first_epoch_resumes_exactly(tiny_mnist, tmp_path, monkeypatch):
    flags = ("--initial-sparsity-fc", "0.9", "--rewire", "--threshold-prune", "--rewire-scaling", "--n-prune-params",
             "50")
    run_training(cfg(tiny_mnist, tmp_path / "a", *flags))
    interrupt_epoch(monkeypatch, 0)
    run = tmp_path / "b" / "mnist_mlp_0"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg(tiny_mnist, tmp_path / "b", *flags))
    assert not (run / "checkpoint.pt").exists() and (run / "initial.pt").exists()
    monkeypatch.undo()
    run_training(cfg(tiny_mnist, tmp_path / "b", *flags, "--resume", str(run)))
    a = read_checkpoint(tmp_path / "a" / "mnist_mlp_0" / "checkpoint.pt")
    b = read_checkpoint(run / "checkpoint.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert a["events"] == b["events"]


def test_ctrl_c_names_the_run_directory(tiny_mnist, tmp_path, capsys, monkeypatch):
    interrupt_epoch(monkeypatch, 1)
    assert main(["train", *argv_for(tiny_mnist, tmp_path)]) == 130
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'mnist_mlp_0'}" in err and "RUN_DIR" not in err


def test_resume_removes_stale_temporaries(tiny_mnist, tmp_path):
    run = tmp_path / "mnist_mlp_0"
    run_training(cfg(tiny_mnist, tmp_path, "--epochs", "1"))
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"x" * 100)
    (run / ".metrics.jsonl.abc.tmp").write_bytes(b"{")
    run_training(cfg(tiny_mnist, tmp_path, "--resume", str(run)))
    assert not temporaries(run)


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tiny_mnist, tmp_path):
    run = tmp_path / "runs" / "mnist_mlp_0"
    args = [sys.executable, str(REPO / "main.py"), *argv_for(tiny_mnist, tmp_path / "runs", "--epochs", "100000")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and f"--resume {run}" in err and "Traceback" not in err
    assert not temporaries(run)
    done = read_checkpoint(run / "checkpoint.pt")["epoch"]
    s = run_training(cfg(tiny_mnist, tmp_path / "runs", "--epochs", str(done + 1), "--resume", str(run)))
    assert [r["epoch"] for r in s["history"]] == list(range(done + 1))


def test_divergence_stops_within_a_few_steps_with_the_step_number(tiny_mnist, tmp_path, monkeypatch, capsys):
    calls = {"train": 0}
    real = F.cross_entropy

    def nan_from_step_5(logits, targets, **kw):
        if kw:  # evaluation passes reduction="sum"
            return real(logits, targets, **kw)
        calls["train"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["train"] == 6 else loss  # 4 steps/epoch: epoch 1, step 1
    monkeypatch.setattr(train_module.F, "cross_entropy", nan_from_step_5)
    one_line_error(capsys, ["train", *argv_for(tiny_mnist, tmp_path, "--epochs", "20")],
                   "non-finite loss at training step 5 (step 1 of epoch 1")
    assert calls["train"] <= 6 + train_module.CHECK_EVERY
    assert read_checkpoint(tmp_path / "mnist_mlp_0" / "checkpoint.pt")["epoch"] == 1


# ---- 5. resume with 3 processes is exact ----------------------------------------------------------

@pytest.mark.slow
def test_three_process_resume_is_bit_identical(tiny_mnist, tmp_path):
    from test_distributed import DSR, flags, launch
    straight = launch(3, [*flags(tiny_mnist, tmp_path, "straight", DSR), "-b", "48"], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = flags(tiny_mnist, tmp_path, "cut", DSR)
    first = launch(3, [*cut, "-b", "48", "--epochs", "1"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch(3, [*cut, "-b", "48", "--resume", str(tmp_path / "runs" / "cut")], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    a = read_checkpoint(tmp_path / "runs" / "straight" / "checkpoint.pt")
    b = read_checkpoint(tmp_path / "runs" / "cut" / "checkpoint.pt")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(v, b["sparsifier"]["masks"][k]) for k, v in a["sparsifier"]["masks"].items())


# ---- 6. readable files, no empty directories, no nan in the table ---------------------------------

def test_output_files_follow_the_umask(tiny_mnist, tmp_path):
    old = os.umask(0o022)
    try:
        run_training(cfg(tiny_mnist, tmp_path, "--epochs", "1"))
    finally:
        os.umask(old)
    for p in (tmp_path / "mnist_mlp_0").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


def test_failed_download_leaves_no_empty_directories(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("network is unreachable")
    monkeypatch.setattr(datasets, "_fetch", offline)
    (tmp_path / "m").mkdir()
    (tmp_path / "c").mkdir()
    for loader, root in ((datasets.load_mnist, tmp_path / "m" / "deep"),
                         (datasets.load_cifar10, tmp_path / "c" / "deep")):
        with pytest.raises(DynsparseError, match="download from"):
            loader(root)
        assert not root.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "m"]  # existing parents stay


def test_val_column_is_a_dash_without_a_validation_set(tiny_mnist, tmp_path):
    lines: list[str] = []
    run_training(cfg(tiny_mnist, tmp_path, "--epochs", "1"), echo=lines.append)
    header = next(ln for ln in lines if "val%" in ln and "img/s" in ln)  # the heads, not the legend
    row = next(ln for ln in lines if ln.split()[:1] == ["0"])
    assert "nan" not in row
    assert row.split()[header.split().index("val%")] == "-"


@pytest.mark.slow
def test_losing_a_rank_stops_the_job_and_it_resumes(tiny_mnist, tmp_path):
    """Rank 1 is SIGKILLed in epoch 1 (as an out-of-memory kill or a lost node would); torchrun
    stops rank 0 with SIGTERM, and the run resumes from its epoch-0 checkpoint."""
    from test_distributed import DSR, flags, launch
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, signal, sys\nimport dynsparse.training.run as R\nreal = R.train_one_epoch\n"
        "def fake(*a, desc='', **kw):\n"
        "    if desc == 'epoch 1' and os.environ.get('RANK') == '1':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, desc=desc, **kw)\n"
        "R.train_one_epoch = fake\nfrom dynsparse.cli.commands import main\nsys.exit(main(['train', *sys.argv[1:]]))\n")
    args = flags(tiny_mnist, tmp_path, "lost", DSR)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    run = tmp_path / "runs" / "lost"
    assert died.returncode != 0
    # rank 0 either sees the broken collective first ("lost another process") or torchrun's SIGTERM
    # first ("terminated (SIGTERM)"): both name the run to resume
    said = [line for line in died.stderr.splitlines() if line.startswith("dynsparse: ")]
    assert any("lost another process of this job" in line or "terminated (SIGTERM)" in line for line in said) \
        and any(f"--resume {run}" in line for line in said), died.stderr[-3000:]
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 1 and not temporaries(run)
    resumed = launch(2, [*args, "--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in json.loads((run / "summary.json").read_text())["history"]] == [0, 1, 2]
