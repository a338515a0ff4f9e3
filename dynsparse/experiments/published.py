"""Published numbers to compare with, each with where it comes from (../shared/reference/RESULTS.md).

Test top-1 accuracy in percent, keyed by model, method and sparsity (``None`` for dense). These
are other people's measurements, made with other code and other training protocols; reports
show them next to ours with a :class:`Source` that says so in words. Nothing of ours is derived
from them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    key: str  # short tag used in tables, e.g. "SL-MNIST"
    file: str  # where the numbers are written down
    description: str  # which implementation and protocol, for a reader


SOURCES = {s.key: s for s in (
    Source("SL-MNIST", "sparse_learning results/MNIST_sparse_summary.csv (RESULTS.md 2.3)",
           "a results table in Dettmers & Zettlemoyer's sparse_learning repository, not dynsparse: its sparse "
           "momentum (SNFS) column comes from that code's own MNIST protocol (LeNet-300-100 without batch "
           "norm, batch 100, 100 epochs; experiments/mnist_sparse_learning_protocol.yaml follows it); how its "
           "DSR, SET and DeepR columns were made is not documented (no code or log in that repository "
           "produces them). One number per sparsity, no spread given."),
    Source("SL-WRN", "sparse_learning results/WRN-28-2_results_summary.csv (RESULTS.md 2.2)",
           "another implementation: Dettmers & Zettlemoyer's sparse_learning code, WRN-28-2 on CIFAR-10 "
           "with that code's own protocol. The DSR paper's own WRN numbers exist only as plotted points."),
    Source("DSR-paper", "Mostafa & Wang, ICLR-2019 submission, Table 2 (RESULTS.md 2.1)",
           "the DSR paper itself: the authors' original code and ImageNet protocol (ResNet-50, batch 256, "
           "SGD with Nesterov momentum; see the original experiment lists), one run per entry."),
)}

_MNIST = {  # sparsity: (DSR, SNFS, SET, DeepR), accuracy fractions in the source
    0.99: (0.9754, 0.9753, 0.958, 0.94), 0.98: (0.9814, 0.982, 0.9774, 0.9821),
    0.97: (0.9820, 0.983, 0.9806, 0.9822), 0.96: (0.9823, 0.9842, 0.9810, 0.983),
    0.95: (0.9832, 0.9853, 0.9814, 0.9806), 0.90: (0.9844, 0.9867, 0.9839, 0.9819),
}
_WRN = {  # sparsity: (DSR, SET, DeepR, SNFS)
    0.9: (93.59, 93.28, 91.41, 93.61), 0.8: (94.40, 94.25, 92.36, 94.32), 0.7: (94.57, 94.40, 92.50, 94.58),
    0.6: (94.66, 94.55, 92.80, 94.68), 0.5: (94.73, 94.76, 92.92, 94.75),
}
_RESNET = {  # sparsity: {method: top-1}
    0.8: {"thin dense": 71.6, "static": 70.4, "prune": 73.2, "dsr": 73.3},
    0.9: {"thin dense": 69.4, "static": 66.4, "prune": 70.3, "dsr": 71.6},
}


def _table() -> dict[tuple[str, str, float | None], tuple[float, Source]]:
    mn, wrn, rn = SOURCES["SL-MNIST"], SOURCES["SL-WRN"], SOURCES["DSR-paper"]
    t: dict = {("mnist_mlp", "dense", None): (98.69, mn), ("cifar10_WideResNet", "dense", None): (94.70, wrn),
               ("imagenet_resnet50", "dense", None): (74.9, rn)}
    for s, vals in _MNIST.items():
        for m, v in zip(("dsr", "snfs", "set", "deepr"), vals):
            t[("mnist_mlp", m, s)] = (round(100 * v, 2), mn)
    for s, vals in _WRN.items():
        for m, v in zip(("dsr", "set", "deepr", "snfs"), vals):
            t[("cifar10_WideResNet", m, s)] = (v, wrn)
    for s, by_method in _RESNET.items():
        for m, v in by_method.items():
            t[("imagenet_resnet50", m, s)] = (v, rn)
    return t


PUBLISHED = _table()

# The architecture each model's published numbers were measured on (LeNet-300-100, WRN-28-2,
# ResNet-50 at width 1): a run of another shape is another network and gets no published number.
PUBLISHED_NAME = {"mnist_mlp": "LeNet-300-100", "cifar10_WideResNet": "WRN-28-2", "imagenet_resnet50": "ResNet-50"}


def architecture(model: str, cfg: dict, *, thin_dense: bool = False) -> str | None:
    """The shape of a run's network when it is not the one its model's published numbers were
    measured on (``"MLP 784-500-500-10"``, ``"WRN-16-2"``, ``"ResNet-50 x2"``), else None.
    ``thin_dense``: the width is the method's own setting (its label already names it)."""
    if model == "mnist_mlp":
        sizes = tuple(cfg.get("hidden_sizes") or (300, 100))
        return None if sizes == (300, 100) else "MLP 784-" + "-".join(map(str, sizes)) + "-10"
    width = float(cfg.get("widen_factor", 10.0))
    if model == "cifar10_WideResNet":
        layers = int(cfg.get("layers", 28))
        same = layers == 28 and (thin_dense or width == 2.0)
        return None if same else f"WRN-{layers}-{width:g}"
    if model == "imagenet_resnet50":
        return None if thin_dense or width == 1.0 else f"ResNet-50 x{width:g}"
    return None


def published(model: str, method: str, sparsity: float | None) -> tuple[float, Source] | None:
    """The published top-1 for this model/method/sparsity, with its :class:`Source`, or None.

    ``method`` is the plain method label: variants (another budget, no batch norm) have no
    published number and get None."""
    key = (model, method, None if method == "dense" else (round(sparsity, 4) if sparsity is not None else None))
    return PUBLISHED.get(key)
