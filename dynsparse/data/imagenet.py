"""ImageNet loaders: ``ImageFolder`` images decoded by ``DataLoader`` worker processes.

Contract (see :mod:`dynsparse.data` for the loader contract shared with MNIST and CIFAR-10):

- ``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (torchvision ``ImageFolder``
  layout; the official validation tarball is flat and must first be sorted into class folders,
  e.g. with the usual ``valprep.sh``). ``val/`` must have the same classes as ``train/``.
- Training: RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3, bilinear) and a horizontal
  flip; evaluation: Resize(256) and CenterCrop(224). Normalized with the ImageNet mean and std.
- Augmentation is reproducible: the sampler draws one seed per sample from ``(seed, epoch)``
  and the worker crops with a ``torch.Generator`` seeded from it, so the draws do not depend on
  the worker count, on earlier epochs or on the global RNG (which is never touched).
- Workers return uint8 images; conversion to float and normalization happen on the device,
  which moves a quarter of the bytes through worker pipes and host-to-device copies.
- Importing this module needs torchvision; :func:`dynsparse.data.build_data` checks for it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.functional as TF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import InterpolationMode

from dynsparse.data.datasets import DATA_ENV
from dynsparse.data.loaders import DataBundle, epoch_generator, pad_to_multiple
from dynsparse.errors import DynsparseError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SIZE = 224  # training crop and evaluation centre crop
RESIZE_SIZE = 256  # evaluation resize of the shorter side
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def resized_crop_params(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop: torchvision's ``RandomResizedCrop.get_params``
    (same algorithm and fallback), drawing from ``g`` instead of the global RNG."""
    area = height * width
    # float32 tensors as in torchvision, so that equal seeds give bit-identical crops
    log_ratio = torch.log(torch.tensor(CROP_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: centre crop at the nearest allowed aspect ratio
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageList(Dataset):
    """``(path, class)`` samples decoded to uint8 ``(3, 224, 224)`` tensors.

    Indexed by ``(index, sample_seed)`` pairs from :class:`EpochSampler`; with ``train`` the
    seed drives the random crop and flip, otherwise it is ignored."""

    def __init__(self, samples: Sequence[tuple[str, int]], train: bool, crop: int | None = None,
                 resize: int | None = None) -> None:
        self.samples, self.train = samples, train
        self.crop, self.resize = crop or CROP_SIZE, resize or RESIZE_SIZE

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, sample_seed = key
        path, target = self.samples[index]
        img = torchvision.datasets.folder.default_loader(path)  # PIL, converted to RGB
        if self.train:
            g = torch.Generator().manual_seed(sample_seed)
            width, height = img.size
            top, left, h, w = resized_crop_params(width, height, g)
            img = TF.resized_crop(img, top, left, h, w, [self.crop, self.crop],
                                  interpolation=InterpolationMode.BILINEAR, antialias=True)
            if torch.rand((), generator=g) < 0.5:
                img = TF.hflip(img)
        else:
            img = TF.resize(img, self.resize, interpolation=InterpolationMode.BILINEAR,
                            antialias=True)
            img = TF.center_crop(img, [self.crop, self.crop])
        return TF.pil_to_tensor(img), target


class EpochSampler(Sampler):
    """This rank's ``(index, sample_seed)`` pairs for the epoch set by :meth:`set_epoch`.

    ``shuffle``: a permutation from ``(seed, epoch)``, padded by wrapping so every rank gets
    ``ceil(n / world_size)`` samples. Otherwise ``0..n-1`` unpadded. Sampling runs in the main
    process, so ``set_epoch`` also reaches persistent workers."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.num_samples = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = epoch_generator(self.seed, self.epoch)
        if self.shuffle:
            order = pad_to_multiple(torch.randperm(self.n, generator=g), self.world_size)
        else:
            order = torch.arange(self.n)
        seeds = torch.randint(0, 2**63 - 1, (len(order),), generator=g)
        mine = slice(self.rank, None, self.world_size)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


class ImageLoader:
    """A ``DataLoader`` over an :class:`ImageList` whose batches arrive on ``device`` as
    normalized float32, with the ``set_epoch``/``num_samples`` of :class:`dynsparse.data.Loader`."""

    def __init__(self, dataset: ImageList, sampler: EpochSampler, *, batch_size: int,
                 device: torch.device, workers: int, persistent: bool) -> None:
        self.sampler, self.device = sampler, device
        self.num_samples = sampler.num_samples
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                 num_workers=workers, pin_memory=device.type == "cuda",
                                 persistent_workers=persistent and workers > 0)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self._scale = (1 / (255 * std)).to(device)
        self._shift = (mean / std).to(device)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).float().mul_(self._scale).sub_(self._shift)
            yield x, y.to(self.device, non_blocking=True)


def _scan(directory: Path) -> torchvision.datasets.ImageFolder:
    try:
        return torchvision.datasets.ImageFolder(os.fspath(directory))
    except (FileNotFoundError, OSError) as e:
        raise DynsparseError(f"cannot read ImageNet images from {os.path.abspath(directory)}: "
                             f"{e}. It must hold one folder of images per class.") from e


def build_imagenet(root: Path, *, batch_size: int, eval_batch_size: int, device: torch.device,
                   holdout: int, augment: bool, workers: int, seed: int, rank: int,
                   world_size: int, image_size: int = 0) -> DataBundle:
    """The ImageNet :class:`DataBundle` (see :func:`dynsparse.data.build_data`).

    ``holdout`` > 0 moves the last ``holdout`` training images (in ``ImageFolder``'s sorted
    order) into ``val``. Only the training loader keeps its workers alive between epochs: the
    evaluation loaders run once per epoch, and idle workers would each hold a copy of the
    sample list. ``image_size``: the crop size, 0 for :func:`dynsparse.data.imagefolder.image_size`'s."""
    missing = [d for d in ("train", "val") if not (root / d).is_dir()]
    if missing:
        raise DynsparseError(f"ImageNet not found: missing {' and '.join(m + '/' for m in missing)}"
                             f" in {os.path.abspath(root)} (ImageNet cannot be downloaded). "
                             f"Point to the folder that holds train/ and val/ with --data DIR or "
                             f"the {DATA_ENV} environment variable.")
    train_set, test_set = _scan(root / "train"), _scan(root / "val")
    if test_set.classes != train_set.classes:
        raise DynsparseError(f"{os.path.abspath(root / 'val')} has classes {test_set.classes[:3]}"
                             f"... but train/ has {train_set.classes[:3]}...: val/ must be sorted "
                             f"into the same class folders as train/")
    samples = train_set.samples
    if len(samples) <= holdout:
        raise DynsparseError(f"--validate-set holds out the last {holdout} ImageNet training "
                             f"images, but {os.path.abspath(root / 'train')} has only "
                             f"{len(samples)}")
    n = len(samples) - holdout
    from dynsparse.data.imagefolder import image_size as size_of
    from dynsparse.data.imagefolder import resize_size
    crop, why = size_of(root, image_size, cap=CROP_SIZE)
    resize = RESIZE_SIZE if crop == CROP_SIZE else resize_size(crop)

    def loader(items: Sequence[tuple[str, int]], train: bool) -> ImageLoader:
        sampler = EpochSampler(len(items), shuffle=train, seed=seed, rank=rank,
                               world_size=world_size)
        return ImageLoader(ImageList(items, train=train and augment, crop=crop, resize=resize), sampler,
                           batch_size=batch_size if train else eval_batch_size, device=device,
                           workers=workers, persistent=train)

    return DataBundle(
        train=loader(samples[:n], train=True),
        test=loader(test_set.samples, train=False),
        val=loader(samples[n:], train=False) if holdout else None,
        train_eval=loader(samples[:n], train=False),
        num_classes=len(train_set.classes),
        num_train=n,
        note=f"images {why}, {workers} loader workers",
        image_size=crop,
    )
