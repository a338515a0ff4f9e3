"""Every README command, run in order in one folder (issue 23 item 4): after the first command,
later examples stopped with "runs/mnist_mlp_0 already holds a run". Each command runs as the
README writes it, on tiny synthetic data, with only what makes it short changed: one epoch, a
WRN-10-1 instead of WRN-28-2, tiny batches, and two jobs of each sweep instead of all of them."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import write_cifar, write_mnist

from dynsparse.cli.commands import main

REPO = Path(__file__).resolve().parents[1]

# commands that cannot run here, by the reason
NOT_RUN = {"python -m pip": "installs packages", "DYNSPARSE_TEST_DATA=": "runs the test suite itself",
           "torchrun": "needs GPUs and ImageNet", "ln -s": "links a Debian package's files (written here instead)"}
TINY_WRN = ["--layers", "10", "--widen-factor", "1", "-b", "50"]
TINY_RANGES = {"experiments/mnist_lenet300.yaml": "0:2", "experiments/wrn28_2_cifar10.yaml": "6:8"}


def readme_commands() -> list[str]:
    """The shell commands of the README's bash blocks, in order; a heredoc stays one command."""
    text = (REPO / "README.md").read_text()
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = iter(block.replace("\\\n", " ").splitlines())
        for line in lines:
            line = re.split(r"\s#\s", line)[0].strip() if not line.lstrip().startswith("#") else ""
            if not line:
                continue
            if "<<'END'" in line:  # cat > FILE <<'END' ... END
                body = []
                for more in lines:
                    if more.strip() == "END":
                        break
                    body.append(more)
                line = line + "\n" + "\n".join(body)
            commands += [part.strip() for part in line.split(" && ")] if "<<" not in line else [line]
    return commands


def tiny(argv: list[str]) -> list[str]:
    """The README's argv with the data moved to the synthetic copies and the work made short."""
    out = []
    for word in argv:
        out.append({"../shared/data": "data", "DATA_ROOT": "data", "DATA": "data", "DIR": "images"}.get(word, word))
    for i, word in enumerate(out[:-1]):
        if word == "--epochs":
            out[i + 1] = "1"
        if word == "-b" and "torchvision:resnet18" in out:
            out[i + 1] = "4"
    if out[0] == "sweep":
        extra = ["--epochs", "1", "--no-progress"] + (TINY_WRN if "wrn" in out[1] else [])
        if out[1] in TINY_RANGES:
            if "--range" in out:
                out[out.index("--range") + 1] = TINY_RANGES[out[1]]
            elif "--job-idx" not in out:
                out[2:2] = ["--range", TINY_RANGES[out[1]]]
        return out + ([] if "--" in out else ["--"]) + extra if "--dry-run" not in out else out
    if "cifar10_WideResNet" in out:
        out += TINY_WRN
    return out + ["--no-progress"] if out[0] == "train" and "--dry-run" not in out else out


def image_folder(root: Path) -> None:
    import torch
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


@pytest.mark.slow
def test_readme_commands_run_in_order_in_one_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "experiments").symlink_to(REPO / "experiments")  # the README runs from the checkout
    write_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=64, n_test=20)
    write_cifar(tmp_path / "data", per_batch=20, n_test=10)
    image_folder(tmp_path / "images")
    ran, skipped = [], []
    for command in readme_commands():
        if command.startswith(tuple(NOT_RUN)):
            skipped.append(command.split()[0])
            continue
        if command.startswith("mkdir -p DATA/FashionMNIST"):  # with the ln -s after it: the data set's files
            write_mnist(tmp_path / "data" / "FashionMNIST" / "raw", n_train=40, n_test=10)
            continue
        if command.startswith("cat > "):
            name, body = command.split()[2], command.split("\n", 1)[1]
            (tmp_path / name).write_text(body.replace("../shared/data", "data") + "\n")
            continue
        argv = shlex.split(command)
        if argv[:2] == ["python", "main.py"]:
            argv = ["train", *argv[2:]]
        else:
            assert argv[0] == "dynsparse", f"a README command this test does not know: {command}"
            argv = argv[1:]
        code = main(tiny(argv))
        out = capsys.readouterr()
        assert code == 0, f"README command failed after {len(ran)} others: {command}\n{out.err[-2000:]}"
        assert "already holds a run" not in out.out + out.err, command
        if argv[0] == "sweep" and "--dry-run" not in argv:
            assert any(line.startswith("sweep: ") and line.endswith(" 0 failed") for line in out.out.splitlines())
        ran.append(command)
    assert len(ran) >= 12, ran
    runs = {p.name for p in (tmp_path / "runs").iterdir()}
    assert {"mnist_mlp_0", "mnist_mlp_fashion_mnist_0", "from_file", "torchvision-resnet18_0",
            "cifar10_WideResNet_6", "cifar10_WideResNet_7", "mnist_dense_s0"} <= runs, runs
    assert (tmp_path / "report" / "report.md").is_file()
    assert set(skipped) == {"python", "DYNSPARSE_TEST_DATA=../shared/data", "torchrun", "ln"}, skipped
