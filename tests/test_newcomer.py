"""What a newcomer still hit (issue 23): no silent shortened resume, a schedule file that says
which file it is, labelled numbers, messages with suggestions, torchvision defaults that fit the
data and the machine, one error under torchrun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynsparse.cli.commands import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "mnist_mlp", "--initial-sparsity-fc", "0.9", "-b", "32", "--no-progress", "--threads", "1"]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dynsparse: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_resume_that_would_shorten_a_finished_run_is_refused_and_changes_nothing(tiny_mnist, tmp_path, capsys):
    """Item 2: --resume runs/full --epochs 2 on a 4-epoch run exited 0 and rewrote config.json and
    the summary to epochs 2 while 4 epochs of history remained."""
    base = ["train", *TINY, "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--name", "full"]
    assert run_main(capsys, [*base, "--epochs", "3"])[0] == 0
    run = tmp_path / "runs" / "full"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_main(capsys, [*base, "--epochs", "2", "--resume", str(run)])
    assert_one_line_error(code, err, "already has 3 trained epochs", "--epochs 2 would shorten it",
                          "nothing was changed")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert json.loads((run / "summary.json").read_text())["config"]["epochs"] == 3


def test_a_schedule_name_that_is_not_a_file_here_says_and_records_the_bundled_copy(tiny_mnist, tmp_path, capsys,
                                                                                  monkeypatch):
    """Item 6: a missing --schedule-file path silently used the bundled copy, and the dry run and
    config.json recorded the path that does not exist."""
    from dynsparse.training.epoch_schedules import BUNDLED_DIR
    monkeypatch.chdir(tmp_path)
    used = str(BUNDLED_DIR / "mnist_schedule.yaml")
    base = ["train", *TINY, "--data", str(tiny_mnist), "--schedule-file", "mnist_schedule.yaml", "--epochs", "1"]
    code, out, _ = run_main(capsys, [*base, "--dry-run"])
    assert code == 0 and f"(from {used}, the copy bundled with dynsparse)" in out, out
    code, out, _ = run_main(capsys, base)
    assert code == 0 and f"learning schedule from {used}" in out
    saved = json.loads((tmp_path / "runs" / "mnist_mlp_0" / "config.json").read_text())
    assert saved["config"]["schedule_file"] == used and Path(saved["config"]["schedule_file"]).is_file()
    # a run saved with the bare name (before this change) still resumes under the resolved path
    from dynsparse.training.checkpoint import config_differences
    assert config_differences({"schedule_file": "mnist_schedule.yaml"}, {"schedule_file": used}) == []
    assert config_differences({"schedule_file": "mnist_prune_schedule.yaml"}, {"schedule_file": used}) != []


def test_dry_run_shows_the_whole_learning_rate_schedule(tiny_mnist, capsys):
    """Item 10: the dry run showed only the first learning rate, not the decays, and '1 epochs'."""
    code, out, _ = run_main(capsys, ["train", *TINY, "--data", str(tiny_mnist), "--schedule-file",
                                     "mnist_schedule.yaml", "--epochs", "20", "--dry-run"])
    assert code == 0 and "20 epochs, batch 32, lr 0.1 (epochs 0-13), 0.02 (epochs 14-17), 0.004 (epochs 18-19)" in out
    code, out, _ = run_main(capsys, ["train", *TINY, "--data", str(tiny_mnist), "--epochs", "1", "--dry-run"])
    assert code == 0 and "1 epoch, batch 32, lr 0.1 (epoch 0)" in out


@pytest.mark.parametrize("validate_train", [False, True])
def test_the_epoch_table_says_what_loss_and_train_mean(tiny_mnist, tmp_path, capsys, validate_train):
    """Item 7: loss and train% meant the running numbers with --no-validate-train and an
    evaluation pass without it, and nothing said which; the progress lines showed another loss."""
    argv = ["train", *[a for a in TINY if a != "--no-progress"], "--data", str(tiny_mnist), "--runs-dir",
            str(tmp_path), "--epochs", "1", "-b", "8"]
    code, out, _ = run_main(capsys, argv + ([] if validate_train else ["--no-validate-train"]))
    assert code == 0
    legend = next(line for line in out.splitlines() if line.startswith("columns: "))
    assert "loss: mean training loss over the epoch's steps" in legend and "updates: topology updates" in legend
    if validate_train:
        assert "train%: a full evaluation pass over the training set" in legend
    else:
        assert "train%: accuracy on the same steps, running (--no-validate-train)" in legend
    progress = [line for line in out.splitlines() if "samples/s ETA" in line]
    assert progress and all("mean so far: loss " in line for line in progress)


def test_output_explains_its_words():
    """Item 10: "entries x slice size", "Np" and "rewires" appeared without explanation."""
    import torch

    from dynsparse import DSR, Sparsifier
    from dynsparse.cli.flags import train_parser
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    s = Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), policy=DSR(), densities=0.5)
    head = s.summary().splitlines()[0]
    assert "slice size" not in head and "entries: mask entries" in head and "active: the weights they keep" in head
    help_text = train_parser().format_help()
    assert "number of weights pruned and regrown at each reallocation (the paper's Np)" in " ".join(help_text.split())


def test_messages_suggest_and_name_flags(tmp_path, capsys):
    """Item 9: --config's unknown key dumped 1,163 characters with no suggestion; --model
    MNIST_MLP had none; --hidden-sizes 0,10 said "got (0, 10)"; widen_factor named the field;
    --threads 0 was accepted."""
    flags = tmp_path / "f.yaml"
    flags.write_text("epochz: 3\n")
    code, _, err = run_main(capsys, ["train", "--config", str(flags), "--dry-run"])
    assert_one_line_error(code, err, "unknown key epochz (did you mean epochs?)", "dynsparse train --help")
    assert len(err) < 300, err
    code, _, err = run_main(capsys, ["train", "--model", "MNIST_MLP", "--dry-run"])
    assert_one_line_error(code, err, "unknown model 'MNIST_MLP'", "did you mean mnist_mlp?")
    code, _, err = run_main(capsys, ["train", "--hidden-sizes", "0,10", "--dry-run"])
    assert_one_line_error(code, err, "--hidden-sizes must be one or more positive integers, got 0,10")
    code, _, err = run_main(capsys, ["train", "--model", "cifar10_WideResNet", "--widen-factor", "0", "--dry-run"])
    assert_one_line_error(code, err, "--widen-factor")
    for bad in ("0", "-1"):
        code, _, err = run_main(capsys, ["train", "--threads", bad, "--dry-run"])
        assert_one_line_error(code, err, "--threads must be >= 1", f"got {bad}")


def test_a_corrupt_checkpoint_is_one_whole_sentence_without_torchs_unsafe_advice(tiny_mnist, tmp_path, capsys):
    """Item 9: the message was cut mid-sentence and ended with PyTorch's advice to load with
    weights_only=False (unsafe, and wrong here)."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage" * 100)
    import torch
    torch.save({"format": "x"}, tmp_path / "whole.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    for bad in (garbage, cut):
        code, _, err = run_main(capsys, ["train", *TINY, "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "r"),
                                         "--resume", str(bad)])
        assert_one_line_error(code, err, f"checkpoint {bad} is corrupt or unreadable", "start over with --overwrite")
        assert "weights_only" not in err and "Re-running" not in err and err.rstrip().endswith("--overwrite"), err


def test_a_full_disk_at_the_first_checkpoint_does_not_claim_a_complete_checkpoint(tiny_mnist, tmp_path, capsys,
                                                                                   monkeypatch):
    """Item 9: a full disk at the first checkpoint said the run "keeps its last complete
    checkpoint" when only initial.pt existed."""
    import errno
    import os
    real = os.fsync

    def fsync(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".checkpoint.pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "runs" / "mnist_mlp_0"
    code, _, err = run_main(capsys, ["train", *TINY, "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"),
                                     "--epochs", "2"])
    assert_one_line_error(code, err, "No space left on device", "holds no finished epoch yet",
                          "initial.pt", f"--resume {run}")
    assert "last complete checkpoint" not in err and not (run / "checkpoint.pt").exists()


def image_folder(root: Path, size: tuple[int, int] = (20, 24), per_class: int = 2) -> Path:
    import torch
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def test_imagefolder_images_keep_their_size_workers_fit_the_machine(tmp_path):
    """Item 5: 64-px images were upscaled to 224-px crops, and 8 loader workers were started on 2
    cores. The size now comes from the data (or --image-size), the workers from the machine."""
    import torch

    from dynsparse.data import build_data
    from dynsparse.data.imagefolder import available_cpus
    root = image_folder(tmp_path / "data")
    bundle = build_data("imagenet", root, batch_size=2, device=torch.device("cpu"), workers=0)
    x, _ = next(iter(bundle.train))
    assert x.shape == (2, 3, 20, 20) and bundle.image_size == 20 and "20 px, the size of the images" in bundle.note
    x, _ = next(iter(bundle.test))
    assert x.shape == (2, 3, 20, 20)
    bundle = build_data("imagenet", root, batch_size=2, device=torch.device("cpu"), workers=0, image_size=12)
    assert next(iter(bundle.train))[0].shape == (2, 3, 12, 12) and "12 px (--image-size)" in bundle.note
    bundle = build_data("imagenet", root, batch_size=2, device=torch.device("cpu"))
    assert bundle.train.loader.num_workers == min(8, available_cpus())


def test_torchvision_runs_get_portable_names_a_plain_dry_run_and_a_time_warning(tmp_path, capsys):
    """Item 5: run folders and plot files got a colon (runs/torchvision:resnet18_0); the dry run
    called the data "imagenet"; a CPU run of hours started without a word."""
    from dynsparse.data import imagefolder
    from dynsparse.training.config import TrainConfig
    assert TrainConfig(model="torchvision:resnet18").run_name == "torchvision-resnet18_0"
    root = image_folder(tmp_path / "data")
    argv = ["train", "--model", "torchvision:resnet18", "--data", str(root), "--runs-dir", str(tmp_path / "runs"),
            "--epochs", "30", "-b", "4", "--rewire", "--initial-sparsity-conv", "0.8", "--dry-run"]
    code, out, _ = run_main(capsys, argv)
    assert code == 0 and "ImageFolder data (train/, val/)" in out and "imagenet" not in out.split("device")[0]
    assert "torchvision-resnet18_0 (new)" in out and "images       20 px, the size of the images" in out
    assert "s per training step on this CPU" in out  # seconds, not hours, at 20 px
    warning = imagefolder.slow_cpu_warning(19.0, 40, 30, 224)  # the README's example as measured on 2 cores
    assert warning.startswith("warning: on this CPU the run takes at least about 8.4 hours")
    assert imagefolder.slow_cpu_warning(0.5, 40, 30, 64) is None
    code, _, err = run_main(capsys, ["train", "--image-size", "28", "--dry-run"])
    assert_one_line_error(code, err, "--image-size", "ImageFolder data")


@pytest.mark.slow
def test_a_torchvision_run_says_its_image_size_and_lands_in_a_portable_folder(tmp_path, capsys):
    root = image_folder(tmp_path / "data")
    code, out, _ = run_main(capsys, ["train", "--model", "torchvision:resnet18", "--data", str(root), "--runs-dir",
                                     str(tmp_path / "runs"), "--rewire", "--initial-sparsity-conv", "0.8", "--epochs",
                                     "1", "-b", "2", "--no-progress", "-j", "0"])
    assert code == 0 and "warning: on this CPU the run takes" not in out  # 1 epoch of 2 steps: seconds
    assert "data: images 20 px, the size of the images" in out and (tmp_path / "runs"
                                                                    / "torchvision-resnet18_0").is_dir()


def test_report_plot_files_have_no_colon(tmp_path):
    from test_report import fake_run

    from dynsparse.experiments.report import build_report
    d = fake_run(tmp_path / "runs", "tv", "dsr", 0.8, 0, 50.0, 1000)
    s = json.loads((d / "summary.json").read_text())
    s["model"] = s["config"]["model"] = "torchvision:resnet18"
    (d / "summary.json").write_text(json.dumps(s))
    paths = build_report([tmp_path / "runs"], tmp_path / "out")
    assert all(":" not in p.name for p in paths) and any(p.name == "curves_torchvision-resnet18.png" for p in paths)


def test_benchmark_evidence_records_the_cpu_model_and_its_vector_extensions(tmp_path, monkeypatch):
    """Item 3: two "2-core x86_64" machines gave 20.0x and 10.4x; the evidence did not say which
    CPU (with AVX-512, AMX or not) made which number."""
    import sys
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    sys.modules.pop("common", None)
    import common
    text = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_bf16\n")
    info = common.cpu_info(text)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["vector_extensions"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                         "amx_tile", "amx_bf16"]
    ev = common.evidence()
    assert ev["cpu"]["model"] and isinstance(ev["cpu"]["vector_extensions"], list) and ev["load_average"] is not None
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write_results("x", {"evidence": {**ev, "cpu": info}}, "# x\n")
    assert "CPU: Intel(R) Xeon(R) Platinum 8480+; vector extensions: sse4_2, avx" in (tmp_path / "x.md").read_text()
    assert json.loads((tmp_path / "x.json").read_text())["evidence"]["cpu"]["vector_extensions"][-1] == "amx_bf16"


def test_accuracy_plot_writes_a_huge_spread_and_spreads_equal_parameter_counts(tmp_path, monkeypatch):
    """Item 10: on the committed MNIST runs one error bar (DeepR 0.98, +-10.6) spanned the whole
    axis and the markers of the methods at one sparsity piled up at ~6k parameters."""
    from dynsparse.experiments import plots
    if not plots.available():
        pytest.skip("matplotlib is not installed")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dynsparse.experiments.report import build_report
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    build_report([REPO / "docs" / "mnist" / "runs"], tmp_path / "out")
    fig = next(f for f in kept if "accuracy against parameter count" in f.axes[0].get_title())
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    bars = [seg for coll in ax.collections for seg in getattr(coll, "get_segments", lambda: [])()
            if len(seg) == 2 and seg[0][0] == seg[1][0] and seg[0][1] != seg[1][1]]  # drawn bars
    assert bars and all(abs(s[1][1] - s[0][1]) <= hi - lo for s in bars)  # none crosses the whole band
    assert all(min(s[0][1], s[1][1]) < hi and max(s[0][1], s[1][1]) > lo for s in bars)  # and each is seen
    assert lo > 91.26  # DeepR 0.98 (91.26 +- 10.64) is below the band: a triangle, its bar not drawn
    xs_at_6k = sorted({round(line.get_xdata()[i]) for line in ax.lines for i in range(len(line.get_xdata()))
                       if 5500 < line.get_xdata()[i] < 7000})
    assert len(xs_at_6k) >= 5, xs_at_6k  # the series at 0.98 sit at distinct x, not on one point
    assert plots.dodge(0, 3) < plots.dodge(1, 3) == 1.0 < plots.dodge(2, 3)


def torchrun(args: list[str], cwd: Path):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "main.py"), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_under_torchrun_a_bad_input_is_said_once_and_last(tiny_mnist, tmp_path):
    """Item 8: a bad-input error was printed once per rank, above about 40 lines of torchrun's
    traceback. Now rank 0 prints it, and torchrun's summary ends with it (its root cause)."""
    done = torchrun(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "-b", "33"],
                    tmp_path)
    assert done.returncode != 0
    line = "dynsparse: error: --batch-size 33 (the global batch) must be divisible by the 2 processes"
    out = done.stdout + done.stderr
    assert out.count(line) == 2, out  # printed by rank 0, and shown again by torchrun's summary
    assert sum(ln.startswith("dynsparse") for ln in out.splitlines()) == 1, out  # rank 1 said nothing
    summary = out.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0" in summary and f"traceback : {line}" in summary
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sync_bn_is_refused_on_cpu_with_a_reason_and_accepted_in_one_process(tiny_mnist, tmp_path, capsys):
    """Item 8: batch-norm statistics are per rank; --sync-bn (SyncBatchNorm) is offered for GPUs.
    PyTorch's SyncBatchNorm raises on CPU tensors under a process group, so on CPU it is refused
    before anything is written."""
    done = torchrun(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"), "--epochs", "1", "-b", "32",
                     "--sync-bn"], tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "dynsparse: error: --sync-bn needs GPUs: PyTorch's SyncBatchNorm does not run " \
        "on CPU" in out and not (tmp_path / "runs").exists()
    # one process sees the whole batch: nothing to synchronize, the flag changes nothing
    code, _, _ = run_main(capsys, ["train", *TINY, "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "one"),
                                   "--epochs", "1", "--sync-bn"])
    assert code == 0


def test_sync_bn_converts_batch_norm_on_cuda_and_refuses_cpu_ranks():
    import torch

    from dynsparse.errors import DynsparseError
    from dynsparse.models import create_model
    from dynsparse.training import distributed
    model = create_model("mnist_mlp")
    one = distributed.DistInfo(0, 1, 0)
    assert distributed.sync_batch_norm(model, one, torch.device("cpu")) is model
    two = distributed.DistInfo(0, 2, 0)
    with pytest.raises(DynsparseError, match="--sync-bn needs GPUs"):
        distributed.sync_batch_norm(model, two, torch.device("cpu"))
    synced = distributed.sync_batch_norm(model, two, torch.device("cuda"))  # conversion itself needs no GPU
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm1d for m in synced.modules())
