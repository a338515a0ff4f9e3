"""ImageFolder data on a small machine (issue 23): the image size taken from the data, as many
loader workers as the machine has, and a time estimate before a CPU run that takes hours.

``--image-size 0`` (the default) uses the shorter side of the first training image, capped at
224 (ImageNet's crop): ImageNet itself keeps 224-pixel crops, a 64-pixel Tiny-ImageNet is no
longer upscaled 12-fold in pixels. The evaluation resize keeps ImageNet's ratio (256 for 224).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_CROP = 224
MAX_WORKERS = 8  # the original's -j default
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Loader workers when ``-j`` is not given: at most 8, at most the CPUs this process may use
    (more only wait for a core, and PyTorch warns about them)."""
    return min(MAX_WORKERS, available_cpus())


def first_image(root: Path) -> Path | None:
    train = Path(root) / "train"
    if not train.is_dir():
        return None
    for cls in sorted(d for d in train.iterdir() if d.is_dir()):
        for f in sorted(cls.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                return f
    return None


def image_size(root: Path, requested: int, cap: int = IMAGENET_CROP) -> tuple[int, str]:
    """The crop size and why: ``--image-size``, else from the first training image, at most ``cap``."""
    if requested:
        return requested, f"{requested} px (--image-size)"
    path = first_image(root)
    if path is None:
        return cap, f"{cap} px (no training image found to size from)"
    from PIL import Image
    with Image.open(path) as img:  # reads the header only
        side = min(img.size)
    if side >= cap:
        return cap, f"{cap} px crops (ImageNet's; the images are {side} px or more)"
    return side, f"{side} px, the size of the images (--image-size N to change it)"


def resize_size(crop: int) -> int:
    return round(crop * 256 / IMAGENET_CROP)


def count_images(root: Path) -> int:
    train = Path(root) / "train"
    return sum(1 for _, _, files in os.walk(train) for f in files if f.lower().endswith(IMAGE_SUFFIXES))


def seconds_per_step(model: nn.Module, size: int, batch: int, classes: int, *, sample: int = 4) -> float:
    """Seconds of one training step at batch ``batch`` on free cores: three times a forward pass
    (the backward pass costs about two), timed on ``sample`` random images in evaluation mode
    without gradients, so that nothing of the model changes (no batch-norm statistics, no
    gradient hooks), and scaled to the batch. Counted in CPU time over the threads, so that
    other work on a shared machine does not inflate it: a busy machine takes longer."""
    was_training = model.training
    x = torch.randn(max(2, min(sample, batch)), 3, size, size)
    try:
        model.eval()
        with torch.no_grad():
            model(x[:2])  # warm-up: first-call allocations
            t0 = time.process_time()
            model(x)
            spent = time.process_time() - t0
    except (RuntimeError, ValueError, TypeError) as e:  # an estimate only: the run itself will say what is wrong
        log.info("no time estimate: %s", e)
        return 0.0
    finally:
        model.train(was_training)
    return 3 * spent / torch.get_num_threads() * batch / x.shape[0]


def slow_cpu_warning(step_s: float, steps_per_epoch: int, epochs: int, size: int) -> str | None:
    """A warning when training takes an hour or more (evaluation passes add about a third)."""
    total = step_s * steps_per_epoch * epochs * 4 / 3
    if total < 3600:
        return None
    return (f"warning: on this CPU the run takes at least about {total / 3600:.1f} hours ({step_s:.2f} s per training "
            f"step at {size} px, {steps_per_epoch:,} steps per epoch, {epochs} epochs, evaluation included); a GPU "
            f"(--device cuda), fewer --epochs, a smaller --image-size or model shortens it")
