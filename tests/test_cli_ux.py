"""What a newcomer meets on the command line: --version, help in sections with choices and
examples, no abbreviations, one-line "did you mean" errors, --config, --threads, a readable
--dry-run, progress outside a terminal, honest summaries and sweep dry runs (issue 16)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import dynsparse
import dynsparse.data as data_module
from dynsparse.cli.commands import main
from dynsparse.cli.flags import GROUPS, parse_train_args, train_parser
from dynsparse.errors import DynsparseError
from dynsparse.experiments.sweep import outcome_summary, run_sweep
from dynsparse.training.checkpoint import CHECKPOINT_FORMAT, RESUME_MAY_CHANGE, config_differences
from dynsparse.training.config import TrainConfig
from dynsparse.training.loop import train_one_epoch
from dynsparse.training.run import run_training

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # --help and --version exit through argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dynsparse: error: ") and err.count("\n") == 1 and "usage:" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_version(capsys):
    code, out, _ = run_main(capsys, ["--version"])
    assert code == 0 and out.strip() == f"dynsparse {dynsparse.__version__}"


def test_train_help_has_sections_choices_examples_and_no_doubled_defaults(capsys):
    code, out, _ = run_main(capsys, ["train", "--help"])
    assert code == 0
    positions = [out.index(f"\n{name}:\n") for name in GROUPS]
    assert positions == sorted(positions), "sections in the order of GROUPS"
    assert "--budget {type,uniform,er,erk}" in out and "--amp {off,bf16}" in out
    assert "torchvision:NAME" in out and "cifar10_WideResNet" in out and "timm:NAME" in out
    assert "examples:" in out and "dynsparse train --model torchvision:resnet18" in out
    flat = " ".join(out.split())
    assert "(default: )" not in flat and "./data) (default" not in flat
    assert "else ./data)" in flat
    # every flag sits in a section, and only in one
    parser = train_parser()
    sections = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert all(any(a.dest in dests for dests in sections.values()) for a in parser._actions)
    assert "epochs" in sections["schedule and optimizer"] and "threads" in sections["distributed and speed"]


def test_torchvision_and_timm_names_stay_valid_models():
    pytest.importorskip("torchvision")
    assert parse_train_args(["--model", "torchvision:resnet18"])[0].model == "torchvision:resnet18"
    with pytest.raises(DynsparseError, match="valid choices"):
        parse_train_args(["--model", "resnet9000"])


def test_abbreviations_are_errors_with_a_suggestion(capsys):
    code, out, err = run_main(capsys, ["train", "--epoch", "1", "--dry-run"])
    assert_one_line_error(code, err, "--epoch", "did you mean --epochs?")
    assert out == ""
    with pytest.raises(DynsparseError, match="did you mean --initial-sparsity-fc"):
        parse_train_args(["--initial-sparsity-f", "0.9"], one_line_errors=True)
    with pytest.raises(SystemExit) as e:  # the library call without one_line_errors exits as argparse does
        parse_train_args(["--lrr", "0.1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("did you mean --lr?")


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "list.yaml", "--dryrun"], "did you mean --dry-run?"),
    (["sweep", "list.yaml", "--job-id", "3"], "did you mean --job-idx?"),
    (["report", "runs", "--otu", "x"], "did you mean --out?"),
])
def test_sweep_and_report_misspellings_are_one_line(capsys, argv, needle):
    code, _, err = run_main(capsys, argv)
    assert_one_line_error(code, err, needle)


def test_dry_run_summary(tiny_mnist, tmp_path, capsys):
    code, out, err = run_main(capsys, ["train", "--data", str(tiny_mnist), "--runs-dir", str(tmp_path / "runs"),
                                       "--rewire", "--threshold-prune", "--rewire-scaling", "--dry-run"])
    assert code == 0, err
    assert re.search(r"^method\s+dsr$", out, re.M)
    assert re.search(r"^device\s+cpu", out, re.M) and "'auto'" not in out
    assert f"{tmp_path / 'runs' / 'mnist_mlp_0'} (new)" in out
    assert re.search(r"^data\s+mnist in .*: found", out, re.M)
    # fc1 at 2% density: 4,704 of its 235,200 weights; totals as a run reports them
    assert re.search(r"^fc1\.weight\s+300x784\s+0\.0200\s+4,704\s+235,200$", out, re.M)
    assert "267,020 parameters, 6,144 learnable" in out
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


def test_dry_run_says_when_the_data_is_missing(tmp_path, capsys):
    code, out, err = run_main(capsys, ["train", "--data", str(tmp_path / "nothing"), "--dry-run"])
    assert_one_line_error(code, err, "MNIST not found", str(tmp_path / "nothing"))
    assert "MISSING" in out


def test_threads_flag_may_change_on_resume():
    assert parse_train_args(["--threads", "1"])[0].threads == 1
    assert "threads" in RESUME_MAY_CHANGE
    assert config_differences({"threads": 1}, {"threads": 2}) == []
    with pytest.raises(DynsparseError, match="--threads must be >= 1"):
        parse_train_args(["--threads", "0"])


def test_config_file_with_command_line_precedence(tmp_path):
    f = tmp_path / "flags.yaml"
    f.write_text(yaml.safe_dump({"epochs": 7, "initial-sparsity-fc": 0.9, "rewire": True, "threshold_prune": True,
                                 "b": 32, "lr": "0.05", "no-progress": True, "mest": False, "hidden-sizes": [20, 10],
                                 "budget": "erk"}))
    cfg, _ = parse_train_args(["--config", str(f)])
    assert (cfg.epochs, cfg.initial_sparsity_fc, cfg.rewire, cfg.threshold_prune) == (7, 0.9, True, True)
    assert (cfg.batch_size, cfg.lr, cfg.progress, cfg.method, cfg.hidden_sizes, cfg.budget) == \
        (32, 0.05, False, "", (20, 10), "erk")
    cfg, _ = parse_train_args(["--epochs", "3", "--config", str(f), "-b", "8", "--budget", "uniform"])
    assert (cfg.epochs, cfg.batch_size, cfg.budget, cfg.initial_sparsity_fc) == (3, 8, "uniform", 0.9)
    assert parse_train_args([])[0] == TrainConfig()  # the file changed nothing for later parses


@pytest.mark.parametrize("content,needles", [
    ("epochz: 3\n", ["unknown key epochz (did you mean epochs?)", "valid keys", "dynsparse train --help"]),
    ("epochs: many\n", ["epochs", "many"]),
    ("rewire: 3\n", ["rewire is a switch"]),
    ("amp: fp8\n", ["--amp must be off or bf16"]),
    ("- epochs\n", ["must be a mapping"]),
])
def test_config_file_errors_are_one_line(tmp_path, capsys, content, needles):
    f = tmp_path / "flags.yaml"
    f.write_text(content)
    code, _, err = run_main(capsys, ["train", "--config", str(f), "--dry-run"])
    assert_one_line_error(code, err, *needles)


def test_progress_lines_every_tenth_of_an_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(20)]
    lines: list[str] = []
    train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), desc="epoch 0",
                    progress_lines=lines.append)
    assert len(lines) == 9, lines
    assert lines[0].startswith("epoch 0:  10% (2/20 steps) mean so far: loss ")
    assert lines[-1].startswith("epoch 0:  90% (18/20")
    assert all(re.search(r"acc \d+\.\d\d% [\d,]+ samples/s ETA \d+:\d\d$", line) for line in lines)


def test_run_outside_a_terminal_prints_progress_aligned_rows_and_names_the_oracle(tiny_mnist, tmp_path):
    lines: list[str] = []
    cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "-b", "4", "--epochs", "2",
                               "--threads", "1"])
    summary = run_training(cfg, echo=lines.append)  # pytest captures stdout: not a terminal
    assert sum("samples/s ETA" in line for line in lines) >= 2 * 5
    header = next(line for line in lines if line.lstrip().startswith("epoch ") and "img/s" in line)
    rows = [line for line in lines if re.match(r"^\s+\d+\s", line)]
    assert len(rows) == 2
    ends = [m.end() for m in re.finditer(r"\S+", header)]
    for row in rows:  # every value ends under its heading
        assert [m.end() for m in re.finditer(r"\S+", row)] == ends, (header, row)
    assert int(rows[0].split()[header.split().index("img/s")].replace(",", "")) > 0
    assert summary["best_test_top1_is_oracle"] is True
    assert summary["selected"] == {"by": "last epoch", "epoch": 1, "test_top1": summary["test_top1"]}
    assert "oracle: chosen on the test set" in lines[-1] and "best test epoch" in lines[-1]
    assert summary["evidence"]["threads"] == 1
    stored = json.loads((tmp_path / "mnist_mlp_0" / "summary.json").read_text())
    assert stored["selected"]["by"] == "last epoch" and "best_test_top1" in stored


def test_validation_selects_the_reported_result(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setitem(data_module._HOLDOUT, "mnist", 10)  # the tiny set cannot spare 10,000 samples
    lines: list[str] = []
    cfg, _ = parse_train_args(["--data", str(tiny_mnist), "--runs-dir", str(tmp_path), "-b", "8", "--epochs", "2",
                               "--validate-set", "--no-progress"])
    summary = run_training(cfg, echo=lines.append)
    sel = summary["selected"]
    assert sel["by"] == "validation" and sel["epoch"] == summary["best_val_epoch"]
    assert sel["test_top1"] == summary["test_top1_at_best_val"]
    assert any(line.startswith(f"selected by validation: epoch {sel['epoch']}, test top-1 {sel['test_top1']:.2f}%")
               for line in lines)
    assert not any("samples/s ETA" in line for line in lines)  # --no-progress: no lines either


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"jobs": lines}))
    return path


def test_sweep_dry_run_prints_command_lines_and_statuses(tmp_path, capsys):
    runs = tmp_path / "runs"
    lst = write_list(tmp_path / "l.yaml", [f"python main.py --name r{i} --job-idx {i}" for i in range(4)])
    (runs / "r0").mkdir(parents=True)
    (runs / "r0" / "summary.json").write_text("{}")
    (runs / "r1").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": TrainConfig(name="r1", job_idx=1, runs_dir=str(runs)).to_dict()},
               runs / "r1" / "checkpoint.pt")
    (runs / "r3").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": TrainConfig(name="r3", job_idx=3, seed=5).to_dict()},
               runs / "r3" / "checkpoint.pt")
    code, out, _ = run_main(capsys, ["sweep", str(lst), "--dry-run", "--", "--runs-dir", str(runs), "--epochs", "1"])
    assert code == 1  # job 3 cannot be resumed under its line
    lines = out.splitlines()
    assert "job 0 (r0): finished" in lines and "job 2 (r2): new" in lines
    assert "job 1 (r1): interrupted" in lines and "job 3 (r3): differs" in lines
    assert lines[lines.index("job 2 (r2): new") + 1] == \
        f"  dynsparse train --name r2 --job-idx 2 --runs-dir {runs} --epochs 1"
    assert lines[lines.index("job 1 (r1): interrupted") + 1] == \
        f"  dynsparse train --name r1 --job-idx 1 --runs-dir {runs} --epochs 1 --resume {runs / 'r1'}"
    assert "sweep: 4 jobs: 1 would run, 1 would resume, 1 skipped (finished before), 1 failed" in lines
    assert not (runs / "r2").exists()


def test_sweep_summary_counts_every_outcome(tmp_path):
    runs = tmp_path / "runs"
    lst = write_list(tmp_path / "l.yaml", ["python main.py --name a --job-idx 0", "python main.py --name b --job-idx 1",
                                           "python main.py --name c --job-idx 2 --initial-sparsity-fc 3",
                                           "python main.py --name d --job-idx 3"])
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "summary.json").write_text("{}")
    (runs / "b").mkdir()
    (runs / "b" / "initial.pt").write_bytes(b"unreadable: the resume reports it")
    outcome = run_sweep(lst, extra=["--runs-dir", str(runs)], echo=lambda s: None, train=lambda c, a: None)
    text = outcome_summary(outcome)
    assert text.splitlines()[0] == "sweep: 4 jobs: 1 ran, 1 resumed, 1 skipped (finished before), 1 failed"
    assert text.splitlines()[1].startswith("  job 2: failed: --initial-sparsity-fc must be in [0, 1)")


def test_sweep_help_cites_a_list_that_exists(capsys):
    code, out, _ = run_main(capsys, ["sweep", "--help"])
    assert code == 0
    cited = set(re.findall(r"experiments/[\w./]+\.yaml", out))
    assert cited and all((REPO / c).is_file() for c in cited), cited
