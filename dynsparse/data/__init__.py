"""Datasets and batch loaders for MNIST, Fashion-MNIST, CIFAR-10 and ImageNet.

Contract:

- :func:`build_data` returns a :class:`DataBundle` of four loaders (train, test, optional
  validation split, and the training set in order without augmentation) that yield
  ``(inputs, targets)`` on the requested device: inputs float32 and normalized, targets int64.
- Every loader has ``set_epoch(epoch)``: the shuffle order and every augmentation draw of an
  epoch are a function of ``(seed, epoch)`` alone, so a run resumed at epoch ``e`` sees exactly
  the batches an uninterrupted run sees. Call it before each epoch; without it every pass
  repeats epoch 0, as with ``DistributedSampler``.
- Sharding: rank ``r`` of ``w`` takes ``order[r::w]`` of the epoch's order. The training order
  is first padded by wrapping (as ``DistributedSampler`` does) so that every rank runs the same
  number of steps; evaluation loaders are not padded, so summing counts over ranks is exact.
- Nothing is dropped: the last batch may be smaller than ``batch_size``.
- (Fashion-)MNIST and CIFAR-10 live entirely on the device as uint8 tensors; batches are gathered,
  augmented (CIFAR: reflect-pad 4, random 32x32 crop, horizontal flip) and normalized there,
  with no per-sample Python work. ImageNet (torchvision ``ImageFolder`` layout) is decoded by a
  ``DataLoader`` with worker processes; see :mod:`dynsparse.data.imagenet`.
- Data roots: MNIST is read from ``ROOT/MNIST/raw/`` (torchvision's layout) or ``ROOT/``;
  Fashion-MNIST (``"fashion_mnist"``, handled exactly as MNIST with its own normalization) from
  ``ROOT/FashionMNIST/raw/`` or ``ROOT/``; CIFAR-10 from ``ROOT/cifar-10-batches-py/`` or
  ``ROOT/``; ImageNet from ``ROOT/train`` and ``ROOT/val``. Missing MNIST/CIFAR files are
  downloaded (checksum verified) unless
  ``download=False``; the readers and downloads are in :mod:`dynsparse.data.datasets`. Every problem
  the user can fix raises :class:`DynsparseError`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dynsparse.data.datasets import DATA_ENV, load_cifar10, load_fashion_mnist, load_mnist
from dynsparse.data.loaders import DataBundle, Loader, epoch_generator, pad_to_multiple  # noqa: F401 (Loader: re-exported)
from dynsparse.errors import DynsparseError, unknown_choice

DATASET_NAMES = ("mnist", "fashion_mnist", "cifar10", "imagenet")
DEFAULT_DATA_ROOT = Path("./data")

# Samples held out from the end of the training set by ``validate_set``, as in the reference.
_HOLDOUT = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 5_000, "imagenet": 10_000}

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Mean and std of all pixels (scaled to [0, 1]) of the 60,000 Fashion-MNIST training images,
# computed once in float64 from Debian's dataset-fashion-mnist files (0.28604, 0.35302), the
# way MNIST's constants come from its training set.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CIFAR10_CROP_PADDING = 4


def resolve_data_root(data: str | os.PathLike | None) -> Path:
    """The data directory: ``data`` if given and non-empty, else ``$DYNSPARSE_DATA`` if set and
    non-empty, else ``./data`` (relative to the current directory). ``~`` is expanded."""
    for candidate in (data, os.environ.get(DATA_ENV)):
        if candidate is not None and os.fspath(candidate) != "":
            return Path(candidate).expanduser()
    return DEFAULT_DATA_ROOT


def random_crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Batched "reflect-pad, random crop to the original size, random horizontal flip".

    ``images`` (B, C, H, W) of any dtype; ``offsets`` (B, 2) int64 in ``[0, 2*padding]``, the
    (row, col) of each crop window in the padded image; ``flips`` (B,) bool. The result equals
    ``F.pad(images, [padding]*4, mode="reflect")`` cropped at the offsets then flipped, but is
    computed as one ``gather`` with reflected source coordinates, so the padded batch is never
    built and uint8 works (``F.pad`` has no integer reflect kernel on every device).
    """
    b, c, h, w = images.shape
    if not 0 <= padding < min(h, w):
        raise ValueError(f"reflect padding {padding} needs 0 <= padding < {min(h, w)}")
    dev = images.device
    rows = torch.arange(h, device=dev) + (offsets[:, :1] - padding)  # (B, H) in image coords
    cols = torch.arange(w, device=dev)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + (offsets[:, 1:] - padding)
    rows, cols = _reflect(rows, h), _reflect(cols, w)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)


def _reflect(i: Tensor, n: int) -> Tensor:
    # Reflection without repeating the edge (numpy/torch "reflect"): -1 -> 1, n -> n-2.
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


class TensorLoader:
    """Batches from a whole dataset held on one device as uint8 ``(N, C, H, W)`` images.

    ``shuffle`` also pads the shards (training); otherwise the order is ``0..N-1`` and shards
    are not padded (evaluation). ``crop_padding > 0`` and ``flip`` turn on the batched CIFAR
    augmentation of :func:`random_crop_flip`. Inputs come out as ``(x - mean) / std`` with
    ``x`` in ``[0, 1]``.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError("images must be uint8 (N, C, H, W) with one label per image")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.crop_padding, self.flip = crop_padding, flip
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        n = len(labels)
        self.num_samples = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))
        # (x / 255 - mean) / std == x * scale - shift, folded once, in float64 for exactness.
        std64 = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        mean64 = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        self._scale = (1 / (255 * std64)).to(images.device, torch.float32)
        self._shift = (mean64 / std64).to(images.device, torch.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, dev = len(self.labels), self.images.device
        g = epoch_generator(self.seed, self.epoch)
        if self.shuffle:
            order = pad_to_multiple(torch.randperm(n, generator=g), self.world_size)
        else:
            order = torch.arange(n)
        mine = slice(self.rank, None, self.world_size)
        index = order[mine].to(dev)
        augment = self.crop_padding > 0 or self.flip
        if augment:
            # Drawn per position of the global order, then sharded like it: a sample's crop
            # does not depend on how many ranks there are.
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (len(order), 2), generator=g)
            flips = torch.rand(len(order), generator=g) < 0.5
            if not self.flip:
                flips.zero_()
            offsets, flips = offsets[mine].to(dev), flips[mine].to(dev)
        for start in range(0, len(index), self.batch_size):
            batch = index[start:start + self.batch_size]
            x = self.images.index_select(0, batch)
            if augment:
                end = start + len(batch)
                x = random_crop_flip(x, offsets[start:end], flips[start:end], self.crop_padding)
            yield x.float().mul_(self._scale).sub_(self._shift), self.labels.index_select(0, batch)


# --------------------------------------------------------------------------- entry point

def build_data(dataset: str, root: Path, *, batch_size: int, device: torch.device,
               validate_set: bool = False, augment: bool = True, workers: int | None = None,
               seed: int = 0, download: bool = True, rank: int = 0, world_size: int = 1,
               eval_batch_size: int | None = None, image_size: int = 0) -> DataBundle:
    """The loaders of ``dataset`` (one of :data:`DATASET_NAMES`) read from ``root``.

    ``validate_set`` holds out the last 10,000 (MNIST, Fashion-MNIST, ImageNet) or 5,000
    (CIFAR-10) training samples as ``val``. ``augment=False`` turns off training augmentation (CIFAR-10 crop and
    flip; ImageNet random-resized-crop and flip, replaced by the evaluation resize and centre
    crop). (Fashion-)MNIST has no augmentation. ``workers`` is used by ImageNet only: the
    others need no worker processes (None: the CPUs available, at most 8); ``image_size`` is the
    ImageNet crop (0: from the data, :mod:`dynsparse.data.imagefolder`). ``download`` applies to all but
    ImageNet. ``eval_batch_size``
    defaults to ``batch_size``.
    """
    if dataset not in DATASET_NAMES:
        raise unknown_choice("dataset", dataset, DATASET_NAMES)
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    if batch_size < 1 or eval_batch_size < 1:
        raise DynsparseError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
    if not 0 <= rank < world_size:
        raise DynsparseError(f"rank must be in [0, world_size), got {rank} of {world_size}")
    if workers is None:
        from dynsparse.data.imagefolder import default_workers
        workers = default_workers()
    if seed < 0 or workers < 0:
        raise DynsparseError(f"seed and workers must be >= 0, got {seed} and {workers}")
    device = torch.device(device)
    root = Path(root)
    holdout = _HOLDOUT[dataset] if validate_set else 0
    if dataset == "imagenet":
        try:
            import torchvision  # noqa: F401  (only to give a clear error when it is missing)
        except ImportError as e:
            raise DynsparseError("imagenet needs torchvision: pip install 'dynsparse[imagenet]'") \
                from e
        from dynsparse.data.imagenet import build_imagenet
        return build_imagenet(root, batch_size=batch_size, eval_batch_size=eval_batch_size,
                              device=device, holdout=holdout, augment=augment, workers=workers,
                              seed=seed, rank=rank, world_size=world_size, image_size=image_size)

    mean: tuple[float, ...]  # per channel: one for the MNIST sets, three for CIFAR-10
    std: tuple[float, ...]
    if dataset == "mnist":
        train_x, train_y, test_x, test_y = load_mnist(root, download=download)
        mean, std, crop_padding, flip = MNIST_MEAN, MNIST_STD, 0, False
    elif dataset == "fashion_mnist":
        train_x, train_y, test_x, test_y = load_fashion_mnist(root, download=download)
        mean, std, crop_padding, flip = FASHION_MNIST_MEAN, FASHION_MNIST_STD, 0, False
    else:
        train_x, train_y, test_x, test_y = load_cifar10(root, download=download)
        mean, std, crop_padding, flip = CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CROP_PADDING, True
    if not augment:
        crop_padding, flip = 0, False
    if len(train_y) <= holdout or len(test_y) == 0:
        raise DynsparseError(
            f"{dataset} in {os.path.abspath(root)} has {len(train_y)} training and {len(test_y)} "
            f"test samples" + (f", but --validate-set holds out the last {holdout} training "
                               f"samples" if holdout else ""))
    n = len(train_y) - holdout

    def loader(x: Tensor, y: Tensor, train: bool = False) -> TensorLoader:
        return TensorLoader(x.to(device), y.to(device), mean=mean, std=std, seed=seed,
                            rank=rank, world_size=world_size,
                            batch_size=batch_size if train else eval_batch_size, shuffle=train,
                            crop_padding=crop_padding if train else 0, flip=flip and train)

    train_x_dev, train_y_dev = train_x[:n].to(device), train_y[:n].to(device)
    return DataBundle(
        train=loader(train_x_dev, train_y_dev, train=True),
        test=loader(test_x, test_y),
        val=loader(train_x[n:], train_y[n:]) if holdout else None,
        train_eval=loader(train_x_dev, train_y_dev),  # shares the device copy with train
        num_classes=10,
        num_train=n,
    )
