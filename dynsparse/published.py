"""Published numbers to compare with, each with its source (from ../shared/reference/RESULTS.md).

Test top-1 accuracy in percent, keyed by model, method and sparsity (``None`` for dense). These
are other people's measurements, shown next to ours in reports; nothing of ours is derived
from them.
"""
from __future__ import annotations

MNIST_SOURCE = "sparse_learning results/MNIST_sparse_summary.csv (RESULTS.md 2.3)"
WRN_SOURCE = "sparse_learning results/WRN-28-2_results_summary.csv (RESULTS.md 2.2)"
RESNET_SOURCE = "Mostafa & Wang, ICLR-2019 submission, Table 2 (RESULTS.md 2.1)"

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


def _table() -> dict[tuple[str, str, float | None], tuple[float, str]]:
    t: dict = {("mnist_mlp", "dense", None): (98.69, MNIST_SOURCE),
               ("cifar10_WideResNet", "dense", None): (94.70, WRN_SOURCE),
               ("imagenet_resnet50", "dense", None): (74.9, RESNET_SOURCE)}
    for s, vals in _MNIST.items():
        for m, v in zip(("dsr", "snfs", "set", "deepr"), vals):
            t[("mnist_mlp", m, s)] = (round(100 * v, 2), MNIST_SOURCE)
    for s, vals in _WRN.items():
        for m, v in zip(("dsr", "set", "deepr", "snfs"), vals):
            t[("cifar10_WideResNet", m, s)] = (v, WRN_SOURCE)
    for s, vals in _RESNET.items():
        for m, v in vals.items():
            t[("imagenet_resnet50", m, s)] = (v, RESNET_SOURCE)
    return t


PUBLISHED = _table()


def published(model: str, method: str, sparsity: float | None) -> tuple[float, str] | None:
    """The published top-1 for this model/method/sparsity, with its source, or None."""
    key = (model, method, None if method == "dense" else (round(sparsity, 4) if sparsity is not None else None))
    return PUBLISHED.get(key)
