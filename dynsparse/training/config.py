"""The resolved configuration of one training run, split by concern.

:class:`TrainConfig` is composed of five parts, each a frozen dataclass with its own fields,
defaults and ``validate()``: :class:`ModelConfig` (the network), :class:`DataConfig` (the data and
its loading), :class:`MethodConfig` (sparsity, the method and its options, its schedule),
:class:`OptimConfig` (the optimizer and the per-epoch schedule file) and :class:`RunConfig` (epochs,
seed, outputs, resume, devices, logging). ``TrainConfig`` inherits their fields, so it is built
and read flat (``TrainConfig(lr=0.05).lr``), ``config.json`` and checkpoints hold the same flat
dict as before the split, and ``cfg.part(MethodConfig)`` gives one concern's settings alone.
``TrainConfig.validate`` runs each part's checks, then those that tie two concerns together.

Field names follow the original command-line flags (``--initial-sparsity-conv`` ->
``initial_sparsity_conv``, ``--DeepR_eta`` -> ``DeepR_eta``) so that a configuration can be
compared with an original job line at a glance. Which method a set of flags means is decided by
the method table in :mod:`dynsparse.training.engine_adapter`, which also checks the method's own settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from dynsparse.errors import DynsparseError

# The data sets a model may train on besides its own (--dataset), by the model's own data set:
# Fashion-MNIST has MNIST's shapes and classes, so the MNIST models read it unchanged.
DATASET_CHOICES: dict[str, tuple[str, ...]] = {"mnist": ("mnist", "fashion_mnist")}


def model_dataset(model: str) -> str | None:
    """The model's own data set, None for a name that is not a model."""
    from dynsparse.models import dataset_of
    try:
        return dataset_of(model)
    except DynsparseError:  # validate() reports the unknown model
        return None


class ConfigPart:
    """What each part of a :class:`TrainConfig` offers: a check of its own fields."""

    __dataclass_fields__: ClassVar[dict[str, Any]]  # every part is a dataclass

    def validate(self) -> None:
        """Reject impossible values of this part's fields with one clear message."""
        raise NotImplementedError


@dataclass(frozen=True)
class ModelConfig(ConfigPart):
    """The network: which one, and its shape."""
    model: str = "mnist_mlp"
    layers: int = 28
    widen_factor: float = 10.0
    no_batch_norm: bool = False
    hidden_sizes: tuple[int, ...] = (300, 100)  # mnist_mlp only; "300,100" and lists are accepted
    sparse_resnet_downsample: bool = False

    def __post_init__(self) -> None:
        # configs come back from JSON as lists, from the command line as "300,100"
        sizes = self.hidden_sizes
        if isinstance(sizes, str):
            try:
                sizes = [int(s) for s in sizes.split(",") if s.strip()]
            except ValueError:
                raise DynsparseError(f"--hidden-sizes must be comma-separated integers, "
                                     f"got {self.hidden_sizes!r}") from None
        object.__setattr__(self, "hidden_sizes", tuple(sizes))

    def validate(self) -> None:
        from dynsparse.models import dataset_of
        dataset_of(self.model)  # unknown model -> error listing the valid names
        if not self.hidden_sizes or any(not isinstance(h, int) or h < 1 for h in self.hidden_sizes):
            raise DynsparseError("--hidden-sizes must be one or more positive integers, got "
                                 + ",".join(map(str, self.hidden_sizes)))
        if self.hidden_sizes != (300, 100) and self.model != "mnist_mlp":
            raise DynsparseError(f"--hidden-sizes is for mnist_mlp, not {self.model}")


@dataclass(frozen=True)
class DataConfig(ConfigPart):
    """The data and how it is loaded."""
    data: str = ""
    dataset: str = ""  # "": the model's own; fashion_mnist for the MNIST models (DATASET_CHOICES)
    batch_size: int = 100
    workers: int | None = None  # None: min(8, the CPUs available) (issue 23; the original: 8)
    image_size: int = 0  # ImageFolder crop size; 0: from the data, at most 224 (dynsparse.data.imagefolder)
    validate_set: bool = False
    no_augment: bool = False
    no_validate_train: bool = False

    def validate(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise DynsparseError(f"-j/--workers must be >= 0 (0: load in the main process), got {self.workers}")
        if self.batch_size < 1:
            raise DynsparseError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class MethodConfig(ConfigPart):
    """What is sparse and how its topology changes: the densities, the method (by name or by the
    original's selector flags) with its options and schedule, pruning, tied weights, storage."""
    method: str = ""  # a method of the registry by name (--method NAME, or its own flag)
    plugin: str = ""  # comma-separated modules (or .py files) that register methods (dynsparse.training.method_flags)
    # issue 24: the policy options given by their own flags (--lam 0.5), as sorted (name, value) pairs
    method_options: tuple[tuple[str, object], ...] = ()
    initial_sparsity_conv: float = 0.5
    initial_sparsity_fc: float = 0.98
    budget: str = "type"
    dense_layers: str = ""
    sub_kernel_granularity: int = 2
    sparse_backend: str = "masked"  # issue 14: masked, csr (truly sparse linear layers) or auto
    # the original's selectors and their settings (DSR, SET, DeepR)
    rewire: bool = False
    threshold_prune: bool = False
    rewire_scaling: bool = False
    n_prune_params: int = 600
    rewire_fraction: float = 0.1
    stop_rewire_epoch: int = 1000
    DeepR: bool = False
    DeepR_eta: float = 0.001
    big_new_weights: bool = False
    L1_loss_coeff: float = 0.0
    conv_group_lasso: bool = False
    # RigL and SNFS
    rigl: bool = False
    sparse_momentum: bool = False
    drop_fraction: float | None = None
    update_end: float = 0.75
    update_period: int | None = None
    keep_optimizer_state: bool = False
    # pruning (issue 11: --global-prune; the original's --threshold-prune is ignored in prune mode)
    prune: bool = False
    prune_target_sparsity_fc: float = 0.98
    prune_target_sparsity_conv: float = 0.5
    prune_iterations: int = 1
    prune_epoch_frequency: int = 2
    start_pruning_after_epoch: int = 20
    post_prune_epochs: int = 10
    cubic_prune_schedule: bool = False
    global_prune: bool = False
    prune_from_scratch: bool = False
    # tied weights (issue 11: --tied-per-kernel shares per 3x3 kernel; the original always shares per weight)
    tied: bool = False
    rescale_tied_gradient: bool = False
    tied_per_kernel: bool = False
    copy_mask_from: str = ""

    def __post_init__(self) -> None:
        # a dict from the library, lists of pairs from config.json
        opts = self.method_options.items() if isinstance(self.method_options, dict) else self.method_options
        object.__setattr__(self, "method_options", tuple(sorted((str(k), v) for k, v in opts)))

    def validate(self) -> None:
        for flag, value in (("--initial-sparsity-conv", self.initial_sparsity_conv),
                            ("--initial-sparsity-fc", self.initial_sparsity_fc)):
            if not 0.0 <= value < 1.0:
                raise DynsparseError(f"{flag} must be in [0, 1) (the removed fraction), got {value}")
        from dynsparse.sparse.storage.masked import check_granularity
        check_granularity(self.sub_kernel_granularity)
        from dynsparse.sparse.storage.build import check_backend
        check_backend(self.sparse_backend)
        if self.sparse_backend != "masked" and (self.tied or self.keep_optimizer_state):
            raise DynsparseError(f"--sparse-backend {self.sparse_backend} stores sparse weights as CSR; "
                                 f"{'--tied' if self.tied else '--keep-optimizer-state'} needs --sparse-backend masked")
        for flag, value in (("--L1-loss-coeff", self.L1_loss_coeff), ("--DeepR_eta", self.DeepR_eta)):
            if not 0.0 <= value < float("inf"):  # also rejects nan
                raise DynsparseError(f"{flag} must be a finite number >= 0, got {value}")
        if self.prune_from_scratch and not self.prune:
            raise DynsparseError("--prune-from-scratch is a variant of --prune; pass both")
        from dynsparse.sparse.budget import BUDGETS
        if self.budget not in BUDGETS:
            raise DynsparseError(f"unknown budget {self.budget!r}; valid choices: {', '.join(sorted(BUDGETS))}")
        if not 0.0 < self.update_end <= 1.0:
            raise DynsparseError(f"--update-end must be in (0, 1] (a fraction of training), got {self.update_end}")
        if self.rescale_tied_gradient and not self.tied:
            raise DynsparseError("--rescale-tied-gradient needs --tied")
        if self.copy_mask_from and (self.tied or self.prune):
            raise DynsparseError("--copy-mask-from copies sparse masks; it does not combine with --tied or --prune")
        for flag, value in (("--prune-target-sparsity-fc", self.prune_target_sparsity_fc),
                            ("--prune-target-sparsity-conv", self.prune_target_sparsity_conv)):
            if self.prune and not 0.0 <= value < 1.0:
                raise DynsparseError(f"{flag} must be in [0, 1), got {value}")
        if self.prune and self.post_prune_epochs < 1:
            raise DynsparseError("prune mode needs --post-prune-epochs >= 1 (the count includes the epoch that "
                                 "ends with the last prune)")
        if self.rewire_scaling and not self.rewire:
            raise DynsparseError("--rewire-scaling needs --rewire (DSR, or SET without --threshold-prune)")
        if self.global_prune and not self.prune:
            raise DynsparseError("--global-prune needs --prune")
        if self.tied_per_kernel and not self.tied:
            raise DynsparseError("--tied-per-kernel needs --tied")
        if self.threshold_prune and not self.rewire and not self.prune:
            raise DynsparseError("--threshold-prune needs --rewire (DSR) or --prune")


@dataclass(frozen=True)
class OptimConfig(ConfigPart):
    """The optimizer (SGD) and the per-epoch schedule file (learning rate, rewiring period, DeepR temperature)."""
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule_file: str | None = None

    def validate(self) -> None:
        for flag, value in (("--lr", self.lr), ("--momentum", self.momentum), ("--weight-decay", self.weight_decay)):
            if not 0.0 <= value < float("inf"):  # also rejects nan
                raise DynsparseError(f"{flag} must be a finite number >= 0, got {value}")


@dataclass(frozen=True)
class RunConfig(ConfigPart):
    """One run: its length, seed, name and outputs, resuming, devices and speed, logging."""
    epochs: int = 100
    start_epoch: int = 0
    seed: int = 0
    name: str = ""
    job_idx: int = 0
    runs_dir: str = "runs"
    resume: str = ""
    overwrite: bool = False
    logger: str = ""  # comma-separated: csv, tensorboard, wandb (dynsparse.training.loggers)
    progress: bool = True
    print_freq: int = 50
    device: str = "auto"
    threads: int = 1  # torch.set_num_threads; may change on resume (issue 23: 1 holds up on shared cores)
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm)
    fsdp: bool = False  # issue 26: parameters sharded by FSDP2 under torchrun (dynsparse.training.fsdp)

    def validate(self) -> None:
        from dynsparse.training.loggers import parse_names
        parse_names(self.logger)
        if self.epochs < 1:
            raise DynsparseError(f"need --epochs >= 1 and 0 <= --start-epoch <= the number of epochs, got "
                                 f"--epochs {self.epochs} --start-epoch {self.start_epoch}")
        if self.threads < 1:  # 0 meant PyTorch's default (every core), which collapses on shared cores
            raise DynsparseError(f"--threads must be >= 1 (CPU threads per operation), got {self.threads}")
        if self.amp not in ("off", "bf16"):
            raise DynsparseError(f"--amp must be off or bf16, got {self.amp!r}")


PARTS: tuple[type[ConfigPart], ...] = (ModelConfig, DataConfig, MethodConfig, OptimConfig, RunConfig)
Part = TypeVar("Part", bound=ConfigPart)


@dataclass(frozen=True)
class TrainConfig(RunConfig, OptimConfig, MethodConfig, DataConfig, ModelConfig):
    """Every setting of a run: the fields of the five parts (model, data, method, optimizer, run),
    flat, and what depends on more than one of them."""

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        MethodConfig.__post_init__(self)
        # --dataset naming the model's own data set is the default: the same run, name and config
        if self.dataset and self.dataset == model_dataset(self.model):
            object.__setattr__(self, "dataset", "")

    def part(self, kind: type[Part]) -> Part:
        """The settings of one concern alone, e.g. ``cfg.part(MethodConfig)``."""
        return kind(**{f.name: getattr(self, f.name) for f in dataclasses.fields(kind)})

    def nominal_sparsity(self) -> float:
        """The sparsity a run is labelled with: of the fc layers for mnist_mlp, of the conv layers
        otherwise (the pruning target in prune mode), as in the paper's tables."""
        if self.prune:
            return self.prune_target_sparsity_fc if self.model == "mnist_mlp" else self.prune_target_sparsity_conv
        return self.initial_sparsity_fc if self.model == "mnist_mlp" else self.initial_sparsity_conv

    @property
    def total_epochs(self) -> int:
        """``--epochs``, except in prune mode, where (as in the original) it is
        start + frequency * (iterations - 1) + post-prune epochs."""
        if self.prune:
            return self.start_pruning_after_epoch + self.prune_epoch_frequency * (self.prune_iterations - 1) \
                + self.post_prune_epochs
        return self.epochs

    @property
    def dataset_name(self) -> str:
        """The data set trained on: ``--dataset``, else the model's own."""
        return self.dataset or model_dataset(self.model) or ""

    @property
    def run_name(self) -> str:
        # another data set is in the default name, so it never lands in the MNIST run's directory
        if self.name:
            return self.name
        model = self.model.replace(":", "-")  # torchvision:resnet18: no colon in a file name (Windows, scp, URLs)
        return f"{model}_{self.dataset}_{self.job_idx}" if self.dataset else f"{model}_{self.job_idx}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Reject impossible values and incompatible flags with one clear message: each part's
        own checks, then those that tie two concerns together."""
        for kind in PARTS:
            self.part(kind).validate()
        from dynsparse.models import dataset_of
        own = dataset_of(self.model)
        choices = DATASET_CHOICES.get(own, (own,))
        if self.dataset and self.dataset not in choices:
            other = "" if own in DATASET_CHOICES else " (fashion_mnist is for the MNIST models: mnist_mlp)"
            raise DynsparseError(f"--dataset {self.dataset} is not available for {self.model}; valid choices: "
                                 f"{', '.join(choices)}{other}")
        if not 0 <= self.start_epoch <= self.total_epochs:  # prune mode decides the number of epochs
            raise DynsparseError(f"need --epochs >= 1 and 0 <= --start-epoch <= the number of epochs, got "
                                 f"--epochs {self.epochs} --start-epoch {self.start_epoch}")
        if self.image_size < 0 or (self.image_size and self.dataset_name != "imagenet"):
            raise DynsparseError(f"--image-size must be >= 1 (0: from the data) and is for ImageFolder data "
                                 f"(imagenet_resnet50, torchvision:NAME, timm:NAME), got {self.image_size} for "
                                 f"{self.model}")
        if self.DeepR and self.sub_kernel_granularity != 4 and self.model != "mnist_mlp":
            raise DynsparseError("--DeepR needs per-weight masks: pass --sub-kernel-granularity 4")
