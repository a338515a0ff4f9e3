"""The loader contract shared by every dataset: what a loader offers, the bundle of a dataset's
loaders, the per-epoch random stream and shard padding (see :mod:`dynsparse.data` for the
contract in words). Kept apart so that :mod:`dynsparse.data` and :mod:`dynsparse.data.imagenet`
both build on it without importing each other."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from dynsparse.errors import DynsparseError


@runtime_checkable
class Loader(Protocol):
    """What the training loop needs from a loader (see the module docstring for the contract)."""

    num_samples: int  # samples this rank sees per epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


@dataclass
class DataBundle:
    """The loaders of one dataset. ``num_train`` counts training samples over all ranks, after
    the validation hold-out and before any shard padding."""

    train: Loader  # shuffled, augmented, sharded with padding
    test: Loader  # in order, no augmentation, sharded without padding
    val: Loader | None  # the held-out split when validate_set, like test
    train_eval: Loader  # the training set like test: for the per-epoch train accuracy pass
    num_classes: int
    num_train: int
    note: str = ""  # what a run should say about how the data is read (ImageFolder: the image size)
    image_size: int = 0  # ImageFolder: the crop size in pixels


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch)``.

    ``SeedSequence`` mixes the pair, so neighbouring seeds or epochs give unrelated streams
    (``seed + epoch`` would make seed 0 epoch 1 equal seed 1 epoch 0)."""
    if seed < 0 or epoch < 0:
        raise DynsparseError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def pad_to_multiple(order: Tensor, world_size: int) -> Tensor:
    """``order`` extended by wrapping around until its length is a multiple of ``world_size``."""
    extra = -len(order) % world_size
    if extra == 0:
        return order
    reps = math.ceil(extra / len(order))
    return torch.cat([order, order.repeat(reps)[:extra]])
