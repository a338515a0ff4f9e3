"""On-disk formats and downloads of MNIST, Fashion-MNIST and CIFAR-10.

Contract: :func:`load_mnist`, :func:`load_fashion_mnist` and :func:`load_cifar10` return
``(train_x, train_y, test_x, test_y)`` as CPU uint8 images (N, C, H, W) and int64 labels, read
from the standard files (MNIST IDX, gzipped or not, in ``ROOT/MNIST/raw/`` or ``ROOT/``;
Fashion-MNIST, the same IDX format and file names, in ``ROOT/FashionMNIST/raw/`` or ``ROOT/``;
CIFAR-10 python batches in ``ROOT/cifar-10-batches-py/`` or ``ROOT/``). Missing files are downloaded with a progress bar
and an md5 check unless ``download=False``; every problem the user can fix raises
:class:`~dynsparse.errors.DynsparseError` naming the files expected and where.
:mod:`dynsparse.data` turns these tensors into loaders.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dynsparse.errors import DynsparseError
from dynsparse.outputs.atomic import file_mode

log = logging.getLogger(__name__)

DATA_ENV = "DYNSPARSE_DATA"

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # stem -> md5 of stem.gz
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Zalando's canonical location and the md5s of its .gz files (as torchvision has them). Copies
# re-compressed elsewhere (Debian's dataset-fashion-mnist) differ in md5 but are read all the
# same: only downloads are checksummed.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # same stems as MNIST_FILES, md5 of stem.gz
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")

_HINT = f"Point to the data with --data DIR or the {DATA_ENV} environment variable."


# --------------------------------------------------------------------------- downloading

def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` into the file ``dest`` (overwritten), with a progress bar on a terminal.

    Raises ``OSError`` (``urllib.error.URLError`` included) or ``http.client.HTTPException``
    when the network fails. Tests replace this function to stay offline."""
    request = urllib.request.Request(url, headers={"User-Agent": "dynsparse"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        # disable=None: no bar when stderr is not a terminal (logs, CI, ranks redirected)
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=None) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch into a temporary file next to ``dest``, check the md5, then rename it into place,
    so that an interrupted download (or several ranks downloading at once) never leaves a
    partial file under the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        log.info("downloading %s to %s", url, dest)
        _fetch(url, Path(tmp))
        got = _md5(Path(tmp))
        if got != md5:
            raise DynsparseError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; "
                                 f"the download is corrupt, try again. {_HINT}")
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would hide shared data from colleagues
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _remove_empty(dirs: list[Path]) -> None:
    """Undo the directories a failed download created (deepest first), if still empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _not_found(what: str, missing: Sequence[str], dirs: Sequence[Path], why: str) -> DynsparseError:
    where = " or ".join(os.path.abspath(d) for d in dirs)
    return DynsparseError(f"{what} not found: missing {', '.join(missing)} in {where} ({why}). "
                          f"{_HINT}")


_DOWNLOAD_ERRORS = (OSError, http.client.HTTPException)

# --------------------------------------------------------------------------- MNIST


def _mnist_files(directory: Path) -> dict[str, Path]:
    found = {}
    for stem in MNIST_FILES:
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[stem] = candidate
                break
    return found


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as a numpy array of its declared shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DynsparseError(f"cannot read {path}: {e}. {_HINT}") from e
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DynsparseError(f"{path} is a corrupt or truncated gzip file: {e}. {_HINT}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DynsparseError(f"{path} is not an IDX file of unsigned bytes "
                             f"(magic number {raw[:4].hex() or 'missing'}). {_HINT}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = np.frombuffer(raw[4:header], dtype=">u4") if len(raw) >= header else None
    if dims is None or len(raw) != header + int(np.prod(dims, dtype=np.int64)):
        raise DynsparseError(f"{path} is truncated or has trailing bytes: {len(raw)} bytes do "
                             f"not match its IDX header. {_HINT}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(tuple(int(d) for d in dims))


def _read_mnist_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DynsparseError(f"{images_path}: expected N x 28 x 28 images, got {images.shape}")
    if labels.shape != (len(images),) or (len(labels) and labels.max() > 9):
        raise DynsparseError(f"{labels_path}: expected {len(images)} labels in 0..9 to match "
                             f"{images_path.name}, got shape {labels.shape}")
    # copy(): frombuffer arrays are read-only, and torch wants writable memory.
    return (torch.from_numpy(images.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def _load_idx_set(root: Path, download: bool, name: str, subdir: str, url: str,
                  md5s: dict[str, str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An MNIST-format data set (four IDX files named as MNIST's) from ``root/subdir/raw`` or
    ``root``, downloaded from ``url`` into ``root/subdir/raw`` when missing and ``download``."""
    raw_dir, dirs = root / subdir / "raw", (root / subdir / "raw", root)
    files = next((f for f in map(_mnist_files, dirs) if len(f) == len(md5s)), None)
    if files is None:
        found = {**_mnist_files(root), **_mnist_files(raw_dir)}
        missing = [f"{s}[.gz]" for s in md5s if s not in found]
        if not download:
            raise _not_found(name, missing, dirs, "downloading is off")
        created = _missing_dirs(raw_dir)
        try:
            for stem, md5 in md5s.items():
                if stem not in _mnist_files(raw_dir):
                    _download(url + stem + ".gz", raw_dir / f"{stem}.gz", md5)
        except _DOWNLOAD_ERRORS as e:
            _remove_empty(created)
            raise _not_found(name, missing, dirs, f"download from {url} failed: {e}") from e
        except BaseException:
            _remove_empty(created)
            raise
        files = _mnist_files(raw_dir)
    log.info("reading %s from %s", name, files["train-images-idx3-ubyte"].parent)
    train = _read_mnist_split(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"])
    test = _read_mnist_split(files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"])
    return (*train, *test)


def load_mnist(root: Path, *, download: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST as CPU tensors ``(train_images, train_labels, test_images, test_labels)``, images
    uint8 (N, 1, 28, 28), labels int64. Looks in ``root/MNIST/raw`` then ``root``; when files are
    missing and ``download``, fetches them into ``root/MNIST/raw``."""
    return _load_idx_set(root, download, "MNIST", "MNIST", MNIST_URL, MNIST_FILES)


def load_fashion_mnist(root: Path, *, download: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST (Xiao et al. 2017), as :func:`load_mnist` returns MNIST. Looks in
    ``root/FashionMNIST/raw`` (torchvision's layout) then ``root``; when files are missing and
    ``download``, fetches them from Zalando into ``root/FashionMNIST/raw``."""
    return _load_idx_set(root, download, "Fashion-MNIST", "FashionMNIST", FASHION_MNIST_URL,
                         FASHION_MNIST_FILES)


# --------------------------------------------------------------------------- CIFAR-10

def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # The official batches are Python 2 pickles (bytes keys); re-made ones may have str.
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # a corrupt pickle can fail in any way; all mean "bad file"
        raise DynsparseError(f"cannot read CIFAR-10 batch {path}: {e!r}. {_HINT}") from e
    batch = batch if isinstance(batch, dict) else {}
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    labels = np.asarray(labels if isinstance(labels, list) else [-1])
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072 or labels.shape != (len(data),)
            or (len(labels) and (labels.min() < 0 or labels.max() > 9))):
        raise DynsparseError(f"{path} is not a CIFAR-10 batch (a dict with uint8 N x 3072 "
                             f"'data' and a list of N 'labels' in 0..9). {_HINT}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _extract_cifar(archive: Path, root: Path) -> None:
    # Extract next to the target and rename the whole folder, so a crash never leaves half a
    # cifar-10-batches-py behind that would later be taken as complete.
    with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-extract-") as tmp:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover - Pythons without PEP 706
                tar.extractall(tmp)
        try:
            os.replace(Path(tmp) / CIFAR10_DIR, root / CIFAR10_DIR)
        except OSError:
            # Fine if another rank extracted it first; a stale partial folder is an error.
            if not all((root / CIFAR10_DIR / n).is_file() for n in CIFAR10_FILES):
                raise


def load_cifar10(root: Path, *, download: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 as CPU tensors ``(train_images, train_labels, test_images, test_labels)``,
    images uint8 (N, 3, 32, 32), labels int64, from the python pickle batches in
    ``root/cifar-10-batches-py`` or ``root``. When missing and ``download``, fetches and
    extracts the official archive into ``root``. Batch files are not checksummed, so re-made
    copies of the data set work. (Pickles can run code: only read batches you trust.)"""
    dirs = (root / CIFAR10_DIR, root)
    found = next((d for d in dirs if all((d / n).is_file() for n in CIFAR10_FILES)), None)
    if found is None:
        missing = [n for n in CIFAR10_FILES if not (root / CIFAR10_DIR / n).is_file()]
        if not download:
            raise _not_found("CIFAR-10", missing, dirs, "downloading is off")
        archive = root / CIFAR10_URL.rsplit("/", 1)[-1]
        created = _missing_dirs(root)
        try:
            if not archive.is_file() or _md5(archive) != CIFAR10_MD5:
                _download(CIFAR10_URL, archive, CIFAR10_MD5)
            _extract_cifar(archive, root)
        except BaseException as e:
            _remove_empty(created)
            if not isinstance(e, (*_DOWNLOAD_ERRORS, tarfile.TarError)):
                raise
            raise _not_found("CIFAR-10", missing, dirs,
                             f"download from {CIFAR10_URL} failed: {e}") from e
        found = root / CIFAR10_DIR
    log.info("reading CIFAR-10 from %s", found)
    train = [_read_cifar_batch(found / n) for n in CIFAR10_FILES[:-1]]
    test_x, test_y = _read_cifar_batch(found / CIFAR10_FILES[-1])
    return (torch.from_numpy(np.concatenate([x for x, _ in train])),
            torch.from_numpy(np.concatenate([y for _, y in train])),
            torch.from_numpy(test_x.copy()), torch.from_numpy(test_y))
