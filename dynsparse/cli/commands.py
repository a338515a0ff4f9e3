"""The command line: ``dynsparse train`` (every flag of the original ``main.py``, see
:mod:`dynsparse.cli.flags`), ``dynsparse sweep`` and ``dynsparse report``. Every
:class:`~dynsparse.errors.DynsparseError` ends the program with one line on stderr and exit 2;
Ctrl-C and SIGTERM end it with the path to resume from.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from dynsparse import __version__
from dynsparse.cli import torchrun
from dynsparse.cli.flags import SuggestingParser, parse_train_args
from dynsparse.errors import DynsparseError

__all__ = ["build_parser", "main", "original_main", "parse_train_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="dynsparse", description="Dynamic sparse reparameterization training.")
    parser.add_argument("--version", action="version", version=f"dynsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train one model (takes the original main.py flags; train --help lists them)",
                           add_help=False)  # `dynsparse train` is parsed by flags.train_parser, never here
    sweep = sub.add_parser("sweep", help="run an experiment list (YAML 'jobs:' of command lines)",
                           description="Run an experiment list. Flags after '--' are appended to every job (they win).",
                           epilog=SWEEP_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("file", help="experiment list, e.g. experiments/mnist_lenet300.yaml or an original list "
                                    "(experiments/original/*.yaml)")
    sweep.add_argument("--job-idx", type=int,
                       help="run only the job with this index (default: $SLURM_ARRAY_TASK_ID, else all)")
    sweep.add_argument("--range", dest="index_range", metavar="A:B", help="run the jobs with A <= index < B")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print each job's command line and status (new, finished, interrupted, differs), train "
                            "nothing")
    report = sub.add_parser("report", help="tables and plots comparing finished runs")
    report.add_argument("runs", nargs="+", help="run directories, or directories that contain them")
    report.add_argument("--out", default="report", help="output directory (default: report)")
    report.add_argument("--title", default="dynsparse report", help="title of the markdown report")
    export = sub.add_parser("export", help="write a run's trained model as a safetensors file (sparse or dense)",
                            description="Write the trained model of a run (its last checkpoint) as safetensors: "
                                        "'sparse' keeps each sparse weight as its nonzeros + int32 CSR indices, "
                                        "'dense' is the plain state_dict of the ordinary architecture.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its checkpoint.pt)")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (e.g. model.safetensors)")
    export.add_argument("--format", dest="export_format", choices=("sparse", "dense"), default="sparse",
                        help="sparse (default; read back with dynsparse.load_sparse) or dense")
    return parser


SWEEP_EXAMPLES = """examples:
  dynsparse sweep experiments/mnist_lenet300.yaml --dry-run -- --data ../shared/data
  dynsparse sweep experiments/mnist_lenet300.yaml --range 0:6 -- --data ../shared/data --epochs 1
  dynsparse sweep experiments/original/wrnet_experiments.yaml --job-idx 6 -- --data DATA
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm and torchrun send before killing): stop like Ctrl-C, resumable."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _interrupted(e: KeyboardInterrupt, command: str) -> int:
    """The message and exit status of an interrupted command: 130 for SIGINT, 143 for SIGTERM."""
    why = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    run_dir = getattr(e, "run_dir", None)
    if command == "sweep":
        hint = "run the same sweep again: it skips finished jobs and resumes interrupted ones"
    elif run_dir is not None and any((run_dir / n).is_file() for n in ("checkpoint.pt", "initial.pt")):
        hint = f"resume with the same flags and --resume {run_dir}"
    else:
        hint = "nothing was saved yet; run the same command again"
    if not torchrun.is_quiet_rank():  # under torchrun rank 0 speaks for the job
        print(f"dynsparse: {why}; {hint}", file=sys.stderr)
        torchrun.record(f"dynsparse: {why}; {hint}")
    return 143 if isinstance(e, Terminated) else 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        return _interrupted(e, "sweep" if argv[:1] == ["sweep"] else "train")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    try:
        if argv and argv[0] == "train":
            cfg, opts = parse_train_args(argv[1:], with_options=True, one_line_errors=True)
            if opts.dry_run:
                from dynsparse.cli.dryrun import describe
                text, problem = describe(cfg)
                print(text)
                if problem:
                    raise DynsparseError(f"{problem}; pass --data DIR or set DYNSPARSE_DATA")
                return 0
            from dynsparse.training.run import run_training
            run_training(cfg, argv=["dynsparse", *argv], echo=print, debug_distributed=opts.debug_distributed)
            return 0
        extra: list[str] = []
        if "--" in argv:
            argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
        ns = build_parser().parse_args(argv)
        if ns.command == "sweep":
            from dynsparse.experiments.sweep import outcome_summary, run_sweep
            outcome = run_sweep(ns.file, job_idx=ns.job_idx, index_range=ns.index_range, extra=extra,
                                dry_run=ns.dry_run)
            print(outcome_summary(outcome, dry_run=ns.dry_run))
            return 1 if any(v.startswith("failed") for v in outcome.values()) else 0
        if ns.command == "export":
            from dynsparse.training.deploy import export_run
            done = export_run(ns.run_dir, ns.out, ns.export_format)
            print(f"wrote {done['file']} ({done['bytes']:,} bytes, {done['format']}) from {done['checkpoint']}")
            return 0
        if ns.command == "report":
            from dynsparse.experiments.report import build_report
            paths = build_report(ns.runs, ns.out, title=ns.title)
            print("wrote " + ", ".join(str(p) for p in paths))
            return 0
        return 2
    except DynsparseError as e:
        torchrun.say_error(f"dynsparse: error: {e}")  # once per torchrun job, also in its summary
        return 2


def original_main(argv: Sequence[str] | None = None) -> int:
    """``python main.py FLAGS`` is ``dynsparse train FLAGS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["train", *argv])
