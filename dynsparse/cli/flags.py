"""The flags of ``dynsparse train``: every flag of the original ``main.py`` with the same names,
meanings and defaults, plus dynsparse's own, a registered method's own switch (``--mest``) and one
per option of a registered policy (``dynsparse.training.method_flags``).

``config_from_args`` is the one table-driven translation from parsed flags to a
:class:`~dynsparse.training.config.TrainConfig`; nothing else reads argparse attributes.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

from dynsparse.cli.config_file import peek_config, read_config_file
from dynsparse.errors import DynsparseError
from dynsparse.sparse.budget import BUDGETS
from dynsparse.training.config import TrainConfig
from dynsparse.training.engine_adapter import METHODS, check
from dynsparse.training.epoch_schedules import resolve_schedule_path
from dynsparse.training.method_flags import add_option_flags, load_plugins, options_from_args, peek_plugins

DEFAULTS = TrainConfig()


def str2bool(text: str) -> bool:
    """``--nesterov False`` means false (the original's ``type=bool`` made every string true)."""
    low = text.strip().lower()
    if low in ("1", "true", "t", "yes", "y", "on"):
        return True
    if low in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {text!r}")


# (flags, keyword arguments) for every flag of the original, in its order, then our own.
ORIGINAL_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--epochs",), dict(type=int, help="number of total epochs to run")),
    (("--start-epoch",), dict(type=int, help="manual epoch number (useful on restarts)")),
    (("--model",),
     dict(metavar="NAME", help="network: mnist_mlp, cifar10_WideResNet, imagenet_resnet50, torchvision:NAME "
                                             "or timm:NAME (any torchvision/timm classifier, on ImageFolder data)")),
    (("-b", "--batch-size"), dict(type=int, help="mini-batch size")),
    (("--lr", "--learning-rate"), dict(type=float, help="learning rate when no --schedule-file gives lr_schedule")),
    (("--momentum",), dict(type=float, help="SGD momentum")),
    (("--nesterov",), dict(type=str2bool, help="Nesterov momentum (True/False)")),
    (("--weight-decay", "--wd"), dict(type=float, help="weight decay on all parameters")),
    (("--L1-loss-coeff",), dict(type=float, help="Lasso coefficient on the sparse weights")),
    (("--print-freq", "-p"),
     dict(type=int, help="kept for compatibility; no effect (progress is a bar, or a line every 10%% of an epoch)")),
    (("--layers",), dict(type=int, help="total number of layers of the wide resnet")),
    (("--start-pruning-after-epoch",), dict(type=int, help="prune mode: epoch after which to start pruning")),
    (("--prune-epoch-frequency",), dict(type=int, help="prune mode: epochs between prunes")),
    (("--prune-target-sparsity-fc",), dict(type=float, help="prune mode: target sparsity of fc layers")),
    (("--prune-target-sparsity-conv",), dict(type=float, help="prune mode: target sparsity of conv layers")),
    (("--prune-iterations",), dict(type=int, help="prune mode: number of prunes")),
    (("--post-prune-epochs",), dict(type=int, help="prune mode: epochs to train after the last prune")),
    (("--n-prune-params",),
     dict(type=int, help="DSR: number of weights pruned and regrown at each reallocation (the paper's Np)")),
    (("--threshold-prune",), dict(action="store_true", help="DSR: prune below a global adaptive threshold")),
    (("--prune",), dict(action="store_true", help="gradual magnitude pruning of a (trained) model")),
    (("--validate-set",), dict(action="store_true", help="hold out a validation split to select the best epoch")),
    (("--rewire-scaling",), dict(action="store_true", help="DSR: move parameters between layers")),
    (("--tied",), dict(action="store_true", help="tied weights (HashedNet-like) instead of sparse ones")),
    (("--rescale-tied-gradient",), dict(action="store_true", help="divide tied gradients by their repetitions")),
    (("--rewire",),
     dict(action="store_true", help="run parameter reallocation (DSR, or SET without --threshold-prune)")),
    (("--no-validate-train",), dict(action="store_true", help="skip the accuracy pass over the training set")),
    (("--DeepR",), dict(action="store_true", help="train with DeepR")),
    (("--DeepR_eta",), dict(type=float, help="DeepR eta (noise std = sqrt(2 eta T))")),
    (("--stop-rewire-epoch",), dict(type=int, help="no reallocation from this epoch on")),
    (("--no-batch-norm",), dict(action="store_true", help="mnist_mlp without batch norm (biases instead)")),
    (("--rewire-fraction",), dict(type=float, help="SET: fraction of each layer to rewire")),
    (("--sub-kernel-granularity",),
     dict(type=int, help="mask granularity: leading dims of a conv weight a mask entry covers (4 = per weight)")),
    (("--cubic-prune-schedule",), dict(action="store_true", help="prune mode: Zhu & Gupta cubic schedule")),
    (("--sparse-resnet-downsample",), dict(action="store_true", help="ResNet-50: sparse downsample convs")),
    (("--conv-group-lasso",), dict(action="store_true", help="group lasso over conv kernels instead of L1")),
    (("--big-new-weights",),
     dict(action="store_true", help="new connections drawn from the initial distribution instead of zero")),
    (("--widen-factor",), dict(type=float, help="width of the wide resnet (also the ResNet-50 width multiplier)")),
    (("--initial-sparsity-conv",), dict(type=float, help="initial sparsity of the sparse conv layers")),
    (("--initial-sparsity-fc",), dict(type=float, help="initial sparsity of the sparse fc layers")),
    (("--job-idx",), dict(type=int, help="job index: the run is saved as RUNS_DIR/{model}_{job_idx} "
                                         "({model}_{dataset}_{job_idx} with another --dataset)")),
    (("--no-augment",), dict(action="store_true", help="no CIFAR-10 data augmentation")),
    (("--data",), dict(metavar="DIR", help="data root (default: $DYNSPARSE_DATA, else ./data)")),
    (("-j", "--workers"), dict(type=int, metavar="N", help="ImageFolder loader worker processes (default: the CPUs "
                                                          "available, at most 8)")),
    (("--copy-mask-from",), dict(help="run or checkpoint whose masks to copy")),
    (("--resume",), dict(help="run directory or checkpoint to resume from")),
    (("--schedule-file",), dict(help="YAML with lr_schedule, rewire_period_schedule, DeepR_temperature_schedule")),
    (("--name",), dict(help="run name (default: {model}_{job_idx}, see --job-idx)")),
]
OWN_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--method",), dict(metavar="NAME", help="a registered method by name (@register_policy; "
                                              "docs/extending.md); the original flags (--rewire, --DeepR, ...) "
                                              "select the paper's methods")),
    (("--plugin",), dict(metavar="MODULE", help="modules or .py files (comma-separated) whose @register_policy "
                                                "methods work as --method NAME, own flags (docs/extending.md)")),
    (("--rigl",), dict(action="store_true", help="RigL (Evci et al. 2020): drop by magnitude, grow by gradient")),
    (("--sparse-momentum",), dict(action="store_true", help="sparse momentum / SNFS (Dettmers & Zettlemoyer 2019)")),
    (("--drop-fraction",), dict(type=float, help="RigL/SNFS/MEST initial drop fraction (RigL, SNFS: cosine-decayed)")),
    (("--update-end",), dict(type=float, help="RigL/SNFS: fraction of training after which the topology is fixed")),
    (("--update-period",), dict(type=int, help="RigL/SNFS: training steps between topology updates (default: "
                                               "RigL rewire_period_schedule, SNFS one epoch, as in the papers)")),
    (("--budget",), dict(metavar="{" + ",".join(BUDGETS) + "}",
                         help="how density is spread over layers (type: the original's conv/fc sparsities)")),
    (("--keep-optimizer-state",), dict(action="store_true", help="do not zero optimizer state off the mask "
                                                               "(the original's behaviour)")),
    (("--dense-layers",), dict(help="comma-separated parameter names or glob patterns to keep dense")),
    (("--amp",),
     dict(metavar="{off,bf16}", help="mixed precision for the forward pass (autocast; weights stay float32)")),
    (("--channels-last",),
     dict(action="store_true", help="channels_last memory format for conv nets (faster on GPUs)")),
    (("--compile",), dict(action="store_true", help="torch.compile the model for training")),
    (("--sparse-backend",), dict(metavar="{masked,csr,auto}", help="storage of sparse weights: masked (dense tensor "
                                 "+ mask, the default), csr (linear weights and the WRN's block convs truly sparse: "
                                 "memory and CPU time shrink with density; same answers) or auto (csr on CPU below "
                                 "the measured crossover density, masked elsewhere); docs/truly_sparse.md")),
    (("--sync-bn",), dict(action="store_true", help="under torchrun on GPUs: batch norm with the statistics of the "
                                                    "global batch (SyncBatchNorm) instead of each process's shard; "
                                                    "not on CPU, where PyTorch's SyncBatchNorm does not run")),
    (("--image-size",), dict(type=int, metavar="PX", help="ImageFolder crop size in pixels (default 0: the size of "
                                                           "the data's images, at most 224)")),
    (("--fsdp",), dict(action="store_true", help="under torchrun: shard the parameters over the ranks with FSDP2 "
                        "(fully_shard) instead of DDP; masked backend; docs/distributed.md")),
    (("--seed",), dict(type=int, help="seed for initialization, masks and data order")),
    (("--device",), dict(help="auto, cpu, cuda or cuda:N (auto: a GPU when there is one)")),
    (("--threads",),
     dict(type=int, metavar="N",
          help="CPU threads for the math within one operation (torch.set_num_threads). 1 by default: more "
               "threads than free cores make PyTorch many times slower (docs/performance.md); on a machine of "
               "your own, try the number of physical cores")),
    (("--runs-dir",), dict(help="directory that holds the run directories (default: runs)")),
    (("--overwrite",), dict(action="store_true", help="start over in an existing run directory")),
    (("--hidden-sizes",), dict(help="mnist_mlp hidden widths, comma-separated, e.g. 10000,10000")),
    (("--dataset",), dict(metavar="{mnist,fashion_mnist}", help="data set of the MNIST models (mnist_mlp): mnist or "
                                                             "fashion_mnist, read from DIR/FashionMNIST/raw/ or DIR/ "
                                                             "(default: the model's own data set)")),
    (("--logger",), dict(help="scalar logs beside metrics.jsonl, comma-separated: csv, tensorboard, wandb "
                               "(pip install 'dynsparse[tensorboard]' or 'dynsparse[wandb]')")),
    (("--no-progress",),
     dict(action="store_false", dest="progress",
          help="no progress within an epoch (default: a bar when stderr is a terminal, a line every 10%% of an epoch "
               "when stdout is not)")),
    (("--global-prune",),
     dict(action="store_true",
          help="with --prune: remove the globally smallest weights of all layers (default: per layer, as the "
               "original)")),
    (("--tied-per-kernel",),
     dict(action="store_true",
          help="with --tied: share whole 3x3 kernels below --sub-kernel-granularity 4 (default: per weight, as the "
               "original)")),
    (("--prune-from-scratch",),
     dict(action="store_true",
          help="with --prune: prune while training from random initialization instead of from --resume DENSE_RUN")),
]


# The help's sections, in order, and the flags (by dest) each holds.
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "dataset", "workers", "image_size", "validate_set", "no_augment", "no_validate_train"),
    "model": ("model", "layers", "widen_factor", "no_batch_norm", "hidden_sizes", "sparse_resnet_downsample"),
    "method and its settings": (
        "method", "plugin", "initial_sparsity_fc", "initial_sparsity_conv", "budget", "dense_layers",
        "sub_kernel_granularity",
        "rewire", "threshold_prune", "rewire_scaling", "n_prune_params", "rewire_fraction", "DeepR", "DeepR_eta",
        "rigl", "sparse_momentum", "drop_fraction", "update_end", "update_period", "big_new_weights",
        "keep_optimizer_state", "L1_loss_coeff", "conv_group_lasso", "prune", "prune_target_sparsity_fc",
        "prune_target_sparsity_conv", "prune_iterations", "prune_epoch_frequency", "start_pruning_after_epoch",
        "post_prune_epochs", "cubic_prune_schedule", "global_prune", "prune_from_scratch", "tied",
        "rescale_tied_gradient", "tied_per_kernel", "copy_mask_from"),
    "schedule and optimizer": ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule_file",
                               "stop_rewire_epoch", "seed"),
    "run and outputs": ("name", "job_idx", "runs_dir", "resume", "overwrite", "logger", "progress"),
    "distributed and speed": ("device", "sync_bn", "threads", "amp", "channels_last", "compile", "sparse_backend",
                              "fsdp"),
    "the original's compatibility flags": ("start_epoch", "print_freq"),
}
GROUP_OF = {dest: group for group, dests in GROUPS.items() for dest in dests}

EXAMPLES = """examples:
  # DSR at 98% sparsity on the MNIST MLP, 20 epochs
  dynsparse train --model mnist_mlp --data DATA --initial-sparsity-fc 0.98 --rewire --threshold-prune \\
      --rewire-scaling --n-prune-params 600 --schedule-file mnist_schedule.yaml -b 50 --epochs 20
  # RigL at 90% sparsity with an ERK budget, flags from a file (the command line wins)
  dynsparse train --config my_flags.yaml --rigl --budget erk --initial-sparsity-fc 0.9
  # a torchvision ResNet-18 on ImageFolder data (DATA/train, DATA/val), SET at 80% sparsity
  dynsparse train --model torchvision:resnet18 --data DATA --rewire --initial-sparsity-conv 0.8 \\
      --initial-sparsity-fc 0.8
  # look before training: method, device, run directory, per-layer densities, data present?
  dynsparse train --model cifar10_WideResNet --widen-factor 2 --rigl --dry-run
"""


def _dest(flags: tuple[str, ...], kwargs: dict) -> str:
    return kwargs.get("dest") or next(f for f in flags if f.startswith("--"))[2:].replace("-", "_")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    table = {_dest(flags, kwargs): (flags, kwargs) for flags, kwargs in ORIGINAL_FLAGS + OWN_FLAGS}
    ungrouped = set(table) - set(GROUP_OF)
    if ungrouped:  # a flag added to a table must be given a section of the help
        raise AssertionError(f"flags without a help section in GROUPS: {sorted(ungrouped)}")
    for group, dests in GROUPS.items():
        for dest in dests:
            flags, kwargs = table[dest]
            kwargs = {"dest": dest, **kwargs}
            default = getattr(DEFAULTS, dest)
            helptext = kwargs.pop("help")
            if dest == "method":  # the registry's names, a plugin's included
                names = ", ".join(m.name for m in METHODS.values() if m.by_name)
                helptext = helptext.replace("by name", f"by name ({names})", 1)
            own = [(m.name, m.spec.options) for m in METHODS.values() if m.spec is not None]
            per_method = [f"{name} {o.default}" for name, opts in own for o in opts.values() if o.field == dest]
            if default is None and per_method:  # each method's own default, from its constructor
                helptext += f" (default: {', '.join(per_method)})"
            if kwargs.get("action") not in ("store_true", "store_false") and "default" not in helptext \
                    and default not in ("", None):
                shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
                helptext += f" (default: {shown})"
            groups[group].add_argument(*flags, default=default, help=helptext, **kwargs)
    for m in METHODS.values():  # registered methods may bring a flag of their own (--mest)
        if m.spec is not None and m.spec.flag:
            groups["method and its settings"].add_argument(m.spec.flag, dest="method", action="store_const",
                                                           const=m.name, help=m.spec.help)
    # each policy option without a flag of the original gets its own (MEST's --lam, SNFS's --beta)
    add_option_flags(groups["method and its settings"], set(parser._option_string_actions), str2bool)
    run = groups["run and outputs"]
    run.add_argument("--config", metavar="FILE.yaml", help="read flags from a YAML file whose keys are the flags "
                     "(epochs: 20, initial-sparsity-fc: 0.98, rewire: true); flags on the command line win")
    run.add_argument("--dry-run", action="store_true", help="print the method, device, run directory, per-layer "
                     "densities and parameter counts, check that the data is there, train nothing")
    groups["distributed and speed"].add_argument(
        "--debug-distributed", action="store_true",
        help="under torchrun: check after every topology update that all ranks hold the same masks and weights")


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig) if f.name != "method_options"}
    values["method_options"] = options_from_args(ns)
    if values["schedule_file"] and not Path(values["schedule_file"]).is_file():
        # a name of a bundled schedule: record the file used, not a path that does not exist (issue 23)
        values["schedule_file"] = str(resolve_schedule_path(values["schedule_file"]))
    cfg = TrainConfig(**values)
    cfg.validate()
    check(cfg)
    return cfg


def _repair_split_path(argv: list[str]) -> list[str]:
    """The original WRN list has ``--schedule-file ./learning_schedules/ wrnet_schedule.yaml``
    (job 68): a path split by a stray space. Join a directory argument and a following bare
    ``*.yaml`` word, which no valid command line contains."""
    out = list(argv)
    for i in range(len(out) - 2):
        if out[i] == "--schedule-file" and out[i + 1].endswith("/") and out[i + 2].endswith(".yaml") \
                and not out[i + 2].startswith("-"):
            logging.getLogger(__name__).warning("joining split schedule path %r %r", out[i + 1], out[i + 2])
            out[i + 1: i + 3] = [out[i + 1] + out[i + 2]]
            break
    return out


class SuggestingParser(argparse.ArgumentParser):
    """No abbreviations (``--epoch`` is not ``--epochs``) and errors in one line, with a "did you
    mean" for a misspelled flag. ``raise_errors``: raise DynsparseError (the command line and
    experiment lists print it as one line) instead of printing and exiting 2 as argparse does."""

    def __init__(self, *args, raise_errors: bool = True, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message: str):
        options = set(self._option_string_actions)
        for action in self._actions:  # a subcommand's unknown flags are reported by the top parser
            if isinstance(action, argparse._SubParsersAction):
                options.update(o for sub in action.choices.values() for o in sub._option_string_actions)
        message = message + suggestion(message, sorted(options))
        if self.raise_errors:
            raise DynsparseError(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def suggestion(message: str, options) -> str:
    """``; did you mean --epochs?`` for the first unrecognized flag of argparse's ``message``."""
    if not message.startswith("unrecognized arguments:"):
        return ""
    word = next((w for w in message.split(":", 1)[1].split() if w.startswith("-")), "")
    close = difflib.get_close_matches(word.split("=")[0], [o for o in options if o.startswith("--")], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def train_parser(*, one_line_errors: bool = True) -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="dynsparse train", raise_errors=one_line_errors, epilog=EXAMPLES,
                              usage="dynsparse train [FLAGS]   (python main.py FLAGS is the same command)",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Train one model. Takes every flag of the original main.py.")
    add_train_flags(parser)
    return parser


def parse_train_args(argv: Sequence[str], *, with_options: bool = False, one_line_errors: bool = False):
    """Parse ``dynsparse train`` flags (or an original ``main.py`` line) into a config; returns
    ``(config, dry_run)``, or ``(config, namespace)`` with ``with_options``. ``one_line_errors``:
    a bad flag raises DynsparseError (for experiment lists and the command line) instead of
    printing one line and exiting 2. ``--config FILE`` sets defaults that the flags override."""
    argv = _repair_split_path(list(argv))
    config_file = peek_config(argv)
    load_plugins(peek_plugins(argv, config_file))  # before the parser: their methods bring flags
    parser = train_parser(one_line_errors=one_line_errors)
    if config_file:
        parser.set_defaults(**read_config_file(config_file, parser))
    ns = parser.parse_args(argv)
    return config_from_args(ns), (ns if with_options else ns.dry_run)
