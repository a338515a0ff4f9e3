"""Shared pytest fixtures, one thread per process, and which tests a bare ``pytest`` runs.

Two CPU cores shared with other work make PyTorch with 2 threads 10-20x slower than with 1, so
every test process (and the processes tests start) uses one thread. Tests marked ``slow`` run
when ``DYNSPARSE_TEST_DATA`` is set (the README's test command, CI) or with ``--run-slow``; a
bare ``pytest`` skips them. Tests marked ``gpu`` run only where CUDA is available.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsparse.data import datasets
from dynsparse.sparse.kernels.conv import set_threads

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the processes tests start
# PyTorch's and numba's (the sparse conv kernels'; with numba's OpenMP layer the two share one runtime,
# and a kernel launched under numba's default count would change PyTorch's)
set_threads(1)

MNIST_STEMS = list(datasets.MNIST_FILES)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    # the GPU smoke suite (tests/test_gpu.py) skips cleanly without CUDA; DYNSPARSE_GPU_SMOKE_DEVICE=cpu
    # runs its logic on the CPU (a dry run of the test code, not of the GPU)
    if not torch.cuda.is_available() and os.environ.get("DYNSPARSE_GPU_SMOKE_DEVICE") != "cpu":
        no_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(no_gpu)
    if os.environ.get("DYNSPARSE_TEST_DATA") or config.getoption("--run-slow"):
        # the modules with slow tests first (a stable sort: each module's tests stay together, in
        # order, so module fixtures are built once): under `-n 2 --maxschedchunk 1` (one test
        # handed out at a time) the long runs then start early and the many short tests even out
        # the two workers at the end; in collection order the real-MNIST runs started late and one
        # worker idled for minutes
        slow_modules = {item.path for item in items if "slow" in item.keywords}
        items.sort(key=lambda item: item.path not in slow_modules)
        return
    skip = pytest.mark.skip(reason="slow: runs with DYNSPARSE_TEST_DATA set or --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real-data directory from ``DYNSPARSE_TEST_DATA``; tests that use it are skipped when it
    is unset (the default), so a bare ``pytest`` never needs data or network."""
    root = os.environ.get("DYNSPARSE_TEST_DATA")
    if not root:
        pytest.skip("set DYNSPARSE_TEST_DATA to a data directory to run real-data tests")
    return Path(root)


# --------------------------------------------------------------------------- tiny synthetic MNIST

def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def mnist_arrays(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixel (0, 0) is the sample's number (offset + i) and pixel (27, 27) is 255."""
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = offset + np.arange(n)
    images[:, 27, 27] = 255
    labels = (offset + np.arange(n)) % 10
    return images, labels.astype(np.uint8)


def write_mnist(directory: Path, n_train: int = 31, n_test: int = 11, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    train, test = mnist_arrays(n_train), mnist_arrays(n_test, offset=100)
    arrays = dict(zip(MNIST_STEMS, (*train, *test)))
    for stem, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


@pytest.fixture
def tiny_mnist(tmp_path: Path) -> Path:
    """A data root with a tiny synthetic MNIST (64 train, 20 test images) in MNIST/raw/."""
    root = tmp_path / "data"
    write_mnist(root / "MNIST" / "raw", n_train=64, n_test=20)
    return root


# --------------------------------------------------------------------------- tiny synthetic CIFAR-10

def cifar_images(n: int, offset: int = 0) -> np.ndarray:
    """(n, 3, 32, 32): red and green are noise, blue is the constant sample number, which survives
    any crop or flip and so identifies the sample."""
    rng = np.random.default_rng(1000 + n + offset)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    images[:, 2] = (offset + np.arange(n))[:, None, None]
    return images


def cifar_batch(images: np.ndarray, labels: np.ndarray, bytes_keys: bool) -> bytes:
    batch = {"data": images.reshape(len(images), -1), "labels": [int(v) for v in labels]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=2)


def write_cifar(root: Path, per_batch: int = 20, n_test: int = 10, bytes_keys: bool = True) -> \
        tuple[np.ndarray, np.ndarray]:
    """Writes root/cifar-10-batches-py; returns the (train, test) images."""
    out = root / datasets.CIFAR10_DIR
    out.mkdir(parents=True, exist_ok=True)
    train = cifar_images(5 * per_batch)
    for b in range(5):
        s = slice(b * per_batch, (b + 1) * per_batch)
        labels = np.arange(s.start, s.stop) % 10
        (out / f"data_batch_{b + 1}").write_bytes(cifar_batch(train[s], labels, bytes_keys))
    test = cifar_images(n_test, offset=200)
    (out / "test_batch").write_bytes(cifar_batch(test, np.arange(n_test) % 10, bytes_keys))
    return train, test


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """A data root with a tiny synthetic CIFAR-10 (5 x 8 train, 16 test images)."""
    root = tmp_path / "data"
    write_cifar(root, per_batch=8, n_test=16)
    return root
