"""Tests of dynsparse.data (and dynsparse.data.datasets, dynsparse.data.imagenet): formats, loaders, sharding, errors.

Everything runs on tiny synthetic files in tmp_path and never touches the network. Real-data
tests run when DYNSPARSE_TEST_DATA (MNIST, tiny-imagenet, and CIFAR-10 made from its JPEG copy) or
DYNSPARSE_TEST_CIFAR_ROOT are set.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MNIST_STEMS, idx_bytes, mnist_arrays, write_cifar, write_mnist  # noqa: E402

import dynsparse.data as data
from dynsparse.data import datasets
from dynsparse.errors import DynsparseError

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- synthetic files

def mnist_ids(x: torch.Tensor) -> list[int]:
    """Recover pixel (0, 0), i.e. the sample number, from normalized MNIST inputs."""
    return torch.round((x[:, 0, 0, 0] * 0.3081 + 0.1307) * 255).long().tolist()


def cifar_ids(x: torch.Tensor) -> list[int]:
    blue = x[:, 2, 0, 0] * (66.7 / 255) + 113.9 / 255
    return torch.round(blue * 255).long().tolist()


def unnormalize_cifar(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    return torch.round((x * std + mean) * 255).to(torch.uint8)


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def no_network(url: str, dest: Path) -> None:
    raise urllib.error.URLError("network is unreachable (test)")


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    write_mnist(tmp_path / "MNIST" / "raw")
    return tmp_path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any test that would reach the network fails loudly instead.
    monkeypatch.setattr(datasets, "_fetch", no_network)


# --------------------------------------------------------------------------- data root

def test_resolve_data_root_prefers_flag_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data.resolve_data_root("") == tmp_path / "env"
    assert data.resolve_data_root(None) == tmp_path / "env"
    monkeypatch.setenv(data.DATA_ENV, "")
    assert data.resolve_data_root(None) == Path("./data")
    monkeypatch.delenv(data.DATA_ENV)
    assert data.resolve_data_root("") == Path("data")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.resolve_data_root("~/x") == tmp_path / "x"


# --------------------------------------------------------------------------- MNIST

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["MNIST/raw", "."])
def test_mnist_shapes_values_and_batches(tmp_path, gz, layout):
    write_mnist(tmp_path / layout, gz=gz)
    b = data.build_data("mnist", tmp_path, batch_size=8, device=CPU, download=False)
    assert (b.num_classes, b.num_train, b.val) == (10, 31, None)
    for loader in (b.train, b.test, b.train_eval):
        assert isinstance(loader, data.Loader)
    assert (len(b.train), b.train.num_samples, len(b.test), b.test.num_samples) == (4, 31, 2, 11)
    got = batches(b.train)
    assert [len(y) for _, y in got] == [8, 8, 8, 7]  # nothing dropped, last batch partial
    x, y = got[0]
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # pixel (27, 27) is 255 in every image: (1 - 0.1307) / 0.3081
    torch.testing.assert_close(x[:, 0, 27, 27], torch.full((8,), (1 - 0.1307) / 0.3081))
    ids = [i for x, _ in got for i in mnist_ids(x)]
    assert sorted(ids) == list(range(31)) and ids != list(range(31))  # a shuffled permutation
    assert torch.equal(torch.cat([y for _, y in got]), torch.tensor(ids) % 10)
    test = batches(b.test)
    assert [i for x, _ in test for i in mnist_ids(x)] == list(range(100, 111))  # in order
    assert torch.cat([y for _, y in test]).tolist() == [i % 10 for i in range(100, 111)]
    assert [i for x, _ in batches(b.train_eval) for i in mnist_ids(x)] == list(range(31))


def test_mnist_validate_set_holds_out_the_last_samples(mnist_root, monkeypatch):
    monkeypatch.setitem(data._HOLDOUT, "mnist", 10)
    b = data.build_data("mnist", mnist_root, batch_size=4, device=CPU, validate_set=True,
                     download=False, eval_batch_size=3)
    assert b.num_train == 21 and b.val.num_samples == 10 and len(b.val) == 4
    assert [i for x, _ in b.val for i in mnist_ids(x)] == list(range(21, 31))
    assert sorted(i for x, _ in b.train for i in mnist_ids(x)) == list(range(21))
    assert [i for x, _ in b.train_eval for i in mnist_ids(x)] == list(range(21))
    monkeypatch.setitem(data._HOLDOUT, "mnist", 31)
    with pytest.raises(DynsparseError, match="has 31 training .* holds out the last 31"):
        data.build_data("mnist", mnist_root, batch_size=4, device=CPU, validate_set=True,
                     download=False)


def test_set_epoch_is_deterministic_and_resumable(mnist_root):
    def order(seed: int, epoch: int | None) -> list[int]:
        b = data.build_data("mnist", mnist_root, batch_size=5, device=CPU, download=False, seed=seed)
        if epoch is not None:
            b.train.set_epoch(epoch)
        return [i for x, _ in b.train for i in mnist_ids(x)]

    b = data.build_data("mnist", mnist_root, batch_size=5, device=CPU, download=False, seed=3)
    b.train.set_epoch(2)
    first, again = batches(b.train), batches(b.train)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    assert [i for x, _ in first for i in mnist_ids(x)] == order(3, 2)  # a fresh ("resumed") run
    assert order(3, 2) != order(3, 1) and order(3, 2) != order(4, 2)
    assert order(0, None) == order(0, 0)  # never calling set_epoch means epoch 0


def test_generator_mixes_seed_and_epoch():
    def draw(seed, epoch):
        return torch.randperm(10, generator=data.epoch_generator(seed, epoch)).tolist()
    assert draw(0, 1) != draw(1, 0) and draw(5, 5) == draw(5, 5)


def test_sharding_eval_covers_every_sample_once_and_train_is_padded(mnist_root, monkeypatch):
    monkeypatch.setitem(data._HOLDOUT, "mnist", 6)
    ranks = [data.build_data("mnist", mnist_root, batch_size=4, device=CPU, download=False,
                          validate_set=True, rank=r, world_size=2, seed=7) for r in range(2)]
    for name, expected in [("test", range(100, 111)), ("val", range(25, 31)),
                           ("train_eval", range(25))]:
        loaders = [getattr(b, name) for b in ranks]
        ids = [[i for x, _ in loader for i in mnist_ids(x)] for loader in loaders]
        assert sorted(ids[0] + ids[1]) == list(expected), name  # exactly once, no padding
        assert sum(loader.num_samples for loader in loaders) == len(expected)
    for b in ranks:
        b.train.set_epoch(4)
    train = [[i for x, _ in b.train for i in mnist_ids(x)] for b in ranks]
    assert len(train[0]) == len(train[1]) == 13 == ranks[0].train.num_samples  # ceil(25 / 2)
    assert len(ranks[0].train) == len(ranks[1].train) == 4
    assert set(train[0] + train[1]) == set(range(25))  # 26 slots: one sample wrapped around
    single = data.build_data("mnist", mnist_root, batch_size=4, device=CPU, download=False,
                          validate_set=True, seed=7)
    single.train.set_epoch(4)
    whole = [i for x, _ in single.train for i in mnist_ids(x)]
    assert train[0] == whole[0::2] and train[1] == (whole + whole[:1])[1::2]  # same permutation


# --------------------------------------------------------------------------- CIFAR-10

def test_random_crop_flip_matches_reflect_pad_crop_flip():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 7, 9), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 7, (16, 2), generator=g)
    offsets[0], offsets[1] = torch.tensor([0, 0]), torch.tensor([6, 6])  # both extremes
    flips = torch.arange(16) % 2 == 0
    got = data.random_crop_flip(images, offsets, flips, padding=3)
    padded = F.pad(images.float(), [3, 3, 3, 3], mode="reflect")
    for k in range(16):
        r, c = offsets[k].tolist()
        window = padded[k, :, r:r + 7, c:c + 9]
        expected = window.flip(-1) if flips[k] else window
        assert torch.equal(got[k].float(), expected), k
    centred = torch.full((16, 2), 3)
    no_aug = data.random_crop_flip(images, centred, torch.zeros(16, dtype=torch.bool), padding=3)
    assert torch.equal(no_aug, images)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar_train_is_augmented_and_eval_is_not(tmp_path, bytes_keys):
    train, test = write_cifar(tmp_path, bytes_keys=bytes_keys)
    b = data.build_data("cifar10", tmp_path, batch_size=32, device=CPU, download=False, seed=1)
    assert (b.num_train, b.num_classes, len(b.train), len(b.test)) == (100, 10, 4, 1)
    x, y = next(iter(b.test))
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == list(range(10))
    assert x[3, 0, 5, 6].item() == pytest.approx((int(test[3, 0, 5, 6]) - 125.3) / 63.0, abs=1e-5)
    assert torch.equal(unnormalize_cifar(x), torch.from_numpy(test))
    padded = F.pad(torch.from_numpy(train).float(), [4] * 4, mode="reflect")
    seen_flip = seen_shift = 0
    ids = []
    for x, y in b.train:
        for img, label, i in zip(unnormalize_cifar(x).float(), y, cifar_ids(x)):
            ids.append(i)
            assert label == i % 10
            windows = {(r, c, f) for r in range(9) for c in range(9) for f in (False, True)
                       if torch.equal(img, (lambda w: w.flip(-1) if f else w)(
                           padded[i, :, r:r + 32, c:c + 32]))}
            assert windows, f"sample {i} is no flipped/unflipped window of its padded image"
            seen_flip += any(f for _, _, f in windows)
            seen_shift += (4, 4, False) not in windows
    assert sorted(ids) == list(range(100))
    assert 20 < seen_flip < 80 and seen_shift > 80


def test_cifar_augment_false_and_validate_set(tmp_path, monkeypatch):
    train, _ = write_cifar(tmp_path)
    monkeypatch.setitem(data._HOLDOUT, "cifar10", 30)
    b = data.build_data("cifar10", tmp_path, batch_size=16, device=CPU, download=False,
                     augment=False, validate_set=True)
    assert b.num_train == 70 and b.val.num_samples == 30
    for x, _ in b.train:
        assert torch.equal(unnormalize_cifar(x), torch.from_numpy(train[cifar_ids(x)]))
    assert [i for x, _ in b.val for i in cifar_ids(x)] == list(range(70, 100))


def test_cifar_accepts_batches_directly_in_root(tmp_path):
    write_cifar(tmp_path)
    for f in (tmp_path / datasets.CIFAR10_DIR).iterdir():
        f.rename(tmp_path / f.name)
    b = data.build_data("cifar10", tmp_path, batch_size=50, device=CPU, download=False)
    assert b.num_train == 100


def test_corrupt_cifar_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / datasets.CIFAR10_DIR / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DynsparseError, match="data_batch_3"):
        data.build_data("cifar10", tmp_path, batch_size=8, device=CPU, download=False)
    (tmp_path / datasets.CIFAR10_DIR / "data_batch_3").write_bytes(pickle.dumps({b"data": [1, 2]}))
    with pytest.raises(DynsparseError, match="data_batch_3 is not a CIFAR-10 batch"):
        data.build_data("cifar10", tmp_path, batch_size=8, device=CPU, download=False)


# --------------------------------------------------------------------------- errors, downloads

def test_missing_files_without_download(tmp_path):
    with pytest.raises(DynsparseError) as e:
        data.build_data("mnist", tmp_path, batch_size=8, device=CPU, download=False)
    msg = str(e.value)
    assert all(stem in msg for stem in MNIST_STEMS)
    assert str(tmp_path / "MNIST" / "raw") in msg and "--data DIR" in msg and data.DATA_ENV in msg
    with pytest.raises(DynsparseError) as e:
        data.build_data("cifar10", tmp_path, batch_size=8, device=CPU, download=False)
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and str(tmp_path) in msg
    assert "--data DIR" in msg and data.DATA_ENV in msg


def test_missing_files_name_only_what_is_missing(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DynsparseError) as e:
        data.load_mnist(tmp_path, download=False)
    assert "missing t10k-labels-idx1-ubyte[.gz] in" in str(e.value)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_failed_download_is_a_clear_error(tmp_path, dataset):
    with pytest.raises(DynsparseError) as e:  # _fetch raises URLError (the autouse fixture)
        data.build_data(dataset, tmp_path, batch_size=8, device=CPU)
    msg = str(e.value)
    assert "download" in msg and "unreachable" in msg and "--data DIR" in msg and data.DATA_ENV in msg
    assert ("train-images-idx3-ubyte" if dataset == "mnist" else "data_batch_1") in msg
    assert not list(tmp_path.rglob("*.part"))  # no temporary file left behind


def test_mnist_download_checks_md5_and_renames_into_place(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_mnist(source)
    for stem in MNIST_STEMS:
        md5 = hashlib.md5((source / f"{stem}.gz").read_bytes()).hexdigest()
        monkeypatch.setitem(datasets.MNIST_FILES, stem, md5)
    fetched = []

    def fake_fetch(url: str, dest: Path) -> None:
        fetched.append(url)
        shutil.copy(source / url.rsplit("/", 1)[-1], dest)

    monkeypatch.setattr(datasets, "_fetch", fake_fetch)
    root = tmp_path / "root"
    b = data.build_data("mnist", root, batch_size=8, device=CPU)
    assert b.num_train == 31 and len(fetched) == 4 and fetched[0].startswith(datasets.MNIST_URL)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == \
        sorted(f"{s}.gz" for s in MNIST_STEMS)
    monkeypatch.setitem(datasets.MNIST_FILES, MNIST_STEMS[0], "0" * 32)
    (root / "MNIST" / "raw" / f"{MNIST_STEMS[0]}.gz").unlink()
    with pytest.raises(DynsparseError, match="checksum mismatch"):
        data.build_data("mnist", root, batch_size=8, device=CPU)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == \
        sorted(f"{s}.gz" for s in MNIST_STEMS[1:])  # the bad file was not kept
    assert fetched[4:] == [datasets.MNIST_URL + MNIST_STEMS[0] + ".gz"]  # only the missing one


def test_cifar_download_extracts_the_archive(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / datasets.CIFAR10_DIR, arcname=datasets.CIFAR10_DIR)
    monkeypatch.setattr(datasets, "CIFAR10_MD5", hashlib.md5(archive.getvalue()).hexdigest())
    monkeypatch.setattr(datasets, "_fetch", lambda url, dest: Path(dest).write_bytes(archive.getvalue()))
    root = tmp_path / "root"
    b = data.build_data("cifar10", root, batch_size=8, device=CPU)
    assert b.num_train == 100 and (root / datasets.CIFAR10_DIR / "test_batch").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_corrupt_idx_files(tmp_path):
    images, _ = mnist_arrays(3)
    good = idx_bytes(images)
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x00\x00\x0d\x03" + good[4:])
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[:-5])
    truncated_gz = tmp_path / "truncated.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-20])
    for path, pattern in [(bad_magic, "not an IDX file"), (truncated, "truncated"),
                          (truncated_gz, "corrupt")]:
        with pytest.raises(DynsparseError, match=pattern) as e:
            datasets.read_idx(path)
        assert str(path) in str(e.value)
    assert np.array_equal(datasets.read_idx(_write(tmp_path / "ok", good)), images)
    write_mnist(tmp_path / "m")
    _write(tmp_path / "m" / "train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.zeros(5))))
    with pytest.raises(DynsparseError, match="train-labels-idx1-ubyte.gz: expected 31 labels"):
        data.build_data("mnist", tmp_path / "m", batch_size=8, device=CPU, download=False)


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def test_bad_arguments(mnist_root):
    with pytest.raises(DynsparseError, match="valid choices: cifar10, fashion_mnist, imagenet, mnist"):
        data.build_data("svhn", mnist_root, batch_size=8, device=CPU)
    with pytest.raises(DynsparseError, match="rank"):
        data.build_data("mnist", mnist_root, batch_size=8, device=CPU, rank=2, world_size=2)
    with pytest.raises(DynsparseError, match="batch size"):
        data.build_data("mnist", mnist_root, batch_size=0, device=CPU)


# --------------------------------------------------------------------------- ImageNet

def write_image_folder(root: Path, per_class: dict[str, int]) -> None:
    from PIL import Image
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for k in range(n):
            # red and green vary across the image so that crops and flips show; blue is 255
            pixels = np.full((10, 12, 3), 255, dtype=np.uint8)
            pixels[..., 0] = np.arange(12) * 20 + k
            pixels[..., 1] = np.arange(10)[:, None] * 25 + (100 if cls == "b" else 0)
            Image.fromarray(pixels).save(root / cls / f"{k}.png")


def test_imagenet_folders(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from dynsparse.data import imagenet
    write_image_folder(tmp_path / "train", {"a": 4, "b": 3})
    write_image_folder(tmp_path / "val", {"a": 2, "b": 1})
    monkeypatch.setattr(imagenet, "CROP_SIZE", 8)  # keep the decoded images tiny
    monkeypatch.setattr(imagenet, "RESIZE_SIZE", 9)
    monkeypatch.setitem(data._HOLDOUT, "imagenet", 2)
    b = data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, workers=0,
                     validate_set=True, seed=5)
    assert (b.num_classes, b.num_train, len(b.train), len(b.test), len(b.val)) == (2, 5, 3, 2, 1)
    b.train.set_epoch(1)
    first, again = batches(b.train), batches(b.train)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, again, strict=True))
    # a fresh run resumed at epoch 1, decoding in a worker process, sees the same batches
    resumed = data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, workers=1,
                           validate_set=True, seed=5).train
    resumed.set_epoch(1)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, resumed, strict=True))
    b.train.set_epoch(2)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, b.train, strict=True))
    assert first[0][0].shape == (2, 3, 8, 8) and first[0][0].dtype == torch.float32
    assert sorted(torch.cat([y for _, y in first]).tolist()) == [0, 0, 0, 0, 1]
    assert [y.tolist() for _, y in b.val] == [[1, 1]]  # last two training images in sorted order
    x, y = next(iter(b.test))
    assert y.tolist() == [0, 0]
    # blue is 255 everywhere: (1 - 0.406) / 0.225 after the evaluation resize and crop
    torch.testing.assert_close(x[:, 2], torch.full((2, 8, 8), (1 - 0.406) / 0.225))
    shards = [data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, workers=0, rank=r,
                           world_size=2).test for r in range(2)]
    assert [s.num_samples for s in shards] == [2, 1]
    assert sorted(v for s in shards for _, y in s for v in y.tolist()) == [0, 0, 1]


def test_imagenet_crop_draws_match_torchvision_and_flip_flips(tmp_path, monkeypatch):
    tv = pytest.importorskip("torchvision")
    from PIL import Image

    from dynsparse.data import imagenet
    for seed, (width, height) in enumerate([(500, 375), (64, 64), (30, 300), (300, 30)] * 50):
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
            torch.manual_seed(seed)
            expected = tv.transforms.RandomResizedCrop.get_params(
                torch.empty(3, height, width), list(imagenet.CROP_SCALE), list(imagenet.CROP_RATIO))
        assert imagenet.resized_crop_params(width, height, torch.Generator().manual_seed(seed)) \
            == expected
    # With the crop pinned to the whole image, a training sample is the image or its mirror.
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    monkeypatch.setattr(imagenet, "CROP_SIZE", 8)
    monkeypatch.setattr(imagenet, "resized_crop_params", lambda w, h, g: (0, 0, h, w))
    dataset = imagenet.ImageList([(str(tmp_path / "x.png"), 0)], train=True)
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    flipped = 0
    for seed in range(100):
        x, _ = dataset[0, seed]
        assert torch.equal(x, image) or torch.equal(x, image.flip(-1))
        flipped += torch.equal(x, image.flip(-1))
    assert 30 < flipped < 70


def test_imagenet_errors(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    write_image_folder(tmp_path / "train", {"a": 1, "b": 1})
    with pytest.raises(DynsparseError, match=r"missing val/ in .*--data DIR"):
        data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, workers=0)
    write_image_folder(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(DynsparseError, match="same class folders"):
        data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, workers=0)
    shutil.rmtree(tmp_path / "val" / "c")
    write_image_folder(tmp_path / "val", {"b": 1})
    with pytest.raises(DynsparseError, match="holds out the last 10000"):
        data.build_data("imagenet", tmp_path, batch_size=2, device=CPU, validate_set=True)


def test_imagenet_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(DynsparseError, match=r"pip install 'dynsparse\[imagenet\]'"):
        data.build_data("imagenet", tmp_path, batch_size=2, device=CPU)


# --------------------------------------------------------------------------- real data

def test_real_mnist(data_root):
    b = data.build_data("mnist", data_root, batch_size=1000, device=CPU, download=False)
    assert (b.num_train, b.test.num_samples, len(b.train), b.num_classes) == (60000, 10000, 60, 10)
    x, y = next(iter(b.train_eval))
    assert y[0].item() == 5 and x.shape == (1000, 1, 28, 28)
    labels = torch.cat([y for _, y in b.test])
    assert labels.min() == 0 and labels.max() == 9 and len(labels) == 10000
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1  # normalized


def test_real_tiny_imagenet(data_root):
    pytest.importorskip("torchvision")
    root = data_root / "tiny-imagenet-200-subset10"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    b = data.build_data("imagenet", root, batch_size=8, device=CPU, workers=0)
    assert (b.num_classes, b.num_train, b.test.num_samples) == (10, 5000, 500)
    x, y = next(iter(b.train))
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32  # the data's own size (issue 23)
    assert 0 <= y.min() and y.max() < 10


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> str:
    """DYNSPARSE_TEST_CIFAR_ROOT, or else the standard batches made from the JPEG copy that the
    shared data root ships with its converter (DYNSPARSE_TEST_DATA/cifar10/, ~10 s, Pillow)."""
    root = os.environ.get("DYNSPARSE_TEST_CIFAR_ROOT")
    if root:
        return root
    data_root = os.environ.get("DYNSPARSE_TEST_DATA")
    maker = Path(data_root) / "cifar10" / "make_cifar10_batches.py" if data_root else None
    if maker is None or not maker.is_file():
        pytest.skip("set DYNSPARSE_TEST_CIFAR_ROOT to a folder holding cifar-10-batches-py, or "
                    "DYNSPARSE_TEST_DATA to a data root with cifar10/make_cifar10_batches.py")
    pytest.importorskip("PIL")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(maker), str(out)], check=True, capture_output=True)
    return str(out)


def test_real_cifar10(cifar_root):
    root = cifar_root
    b = data.build_data("cifar10", Path(root), batch_size=500, device=CPU, download=False,
                     validate_set=True)
    assert (b.num_train, b.val.num_samples, b.test.num_samples) == (45000, 5000, 10000)
    assert len(b.train) == math.ceil(45000 / 500)
    x, y = next(iter(b.train_eval))
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # the official training order
    assert x.shape == (500, 3, 32, 32) and abs(x.mean().item()) < 0.2
