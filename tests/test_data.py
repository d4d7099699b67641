"""Tests for snncompress.data.

Tests that need the offline data read its location from ``SNNCOMPRESS_DATA``
(CI passes ``../shared/data``) and skip when it is unset. The full CIFAR-10
JPEG decode (~20 s on 2 cores) runs only with ``SNNCOMPRESS_TEST_CIFAR_JPG=1``;
a synthetic 10-class tar exercises the same code path quickly.
"""

from __future__ import annotations

import importlib.resources
import io
import itertools
import os
import pathlib
import tarfile

import numpy as np
import pytest
import torch

from snncompress import data
from snncompress.data import jpeg_cache
from snncompress.data import (
    DATASET_NAMES,
    DatasetInfo,
    TensorBatchLoader,
    balanced_subset,
    calibration_batch,
    load_data,
    random_crop_flip,
    resolve_data_dir,
)
from snncompress.errors import UserError

DATA_DIR = os.environ.get("SNNCOMPRESS_DATA")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="SNNCOMPRESS_DATA not set")


@pytest.fixture(scope="module")
def builtin():
    return load_data("mnist-builtin", batch_size=256)


def _all_batches(loader):
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


# --- built-in subset ---------------------------------------------------------


def test_builtin_file_contents():
    resource = importlib.resources.files("snncompress") / "data_builtin" / "mnist_subset.npz"
    with importlib.resources.as_file(resource) as path, np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["test_images", "test_labels", "train_images", "train_labels"]
        assert npz["train_images"].shape == (12000, 28, 28) and npz["train_images"].dtype == np.uint8
        assert npz["test_images"].shape == (2000, 28, 28) and npz["test_images"].dtype == np.uint8
        assert np.bincount(npz["train_labels"]).tolist() == [1200] * 10
        assert np.bincount(npz["test_labels"]).tolist() == [200] * 10
    assert path.stat().st_size < 4_000_000


def test_builtin_info_and_balance(builtin):
    train, test, info = builtin
    assert info == DatasetInfo("mnist-builtin", (1, 28, 28), 10, (0.1307,), (0.3081,), 12000, 2000)
    assert len(train) == 47 and len(test) == 8  # ceil(12000/256), ceil(2000/256)
    _, train_labels = _all_batches(train)
    _, test_labels = _all_batches(test)
    assert train_labels.dtype == torch.int64
    assert torch.bincount(train_labels).tolist() == [1200] * 10
    assert torch.bincount(test_labels).tolist() == [200] * 10


def test_builtin_normalised_statistics(builtin):
    train, _, _ = builtin
    images, _ = _all_batches(train)
    assert images.shape == (12000, 1, 28, 28) and images.dtype == torch.float32
    # Subset pixel statistics are close to full MNIST's 0.1307 / 0.3081.
    assert abs(images.mean().item()) < 0.02
    assert abs(images.std().item() - 1.0) < 0.02
    assert images.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert images.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


# --- determinism ---------------------------------------------------------------


def test_same_seed_same_batches_different_seed_different():
    first = [next(iter(load_data("mnist-builtin", batch_size=64, seed=s)[0])) for s in (3, 3, 4)]
    assert torch.equal(first[0][0], first[1][0]) and torch.equal(first[0][1], first[1][1])
    assert not torch.equal(first[0][1], first[2][1])


def test_epochs_reshuffle_and_set_epoch_replays(builtin):
    train, _, _ = builtin
    train.set_epoch(0)
    epoch0 = next(iter(train))[1]
    epoch1 = next(iter(train))[1]
    train.set_epoch(0)
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(next(iter(train))[1], epoch0)


def test_test_loader_is_ordered_and_repeatable(builtin):
    _, test, _ = builtin
    images_a, labels_a = _all_batches(test)
    images_b, labels_b = _all_batches(test)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert torch.equal(labels_a, test.labels)  # storage order, nothing shuffled


def test_subsets_are_balanced_and_deterministic():
    train_a, test_a, info = load_data("mnist-builtin", train_subset=1000, test_subset=105, seed=1)
    train_b, test_b, _ = load_data("mnist-builtin", train_subset=1000, test_subset=105, seed=2)
    assert (info.train_size, info.test_size) == (1000, 105)
    assert torch.bincount(train_a.labels).tolist() == [100] * 10
    assert sorted(torch.bincount(test_a.labels).tolist()) == [10] * 5 + [11] * 5
    assert torch.equal(train_a.images, train_b.images)  # subset does not depend on the training seed
    assert torch.equal(test_a.labels, test_b.labels)


def test_balanced_subset_handles_uneven_classes():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 20)
    keep = balanced_subset(labels, 30, seed=5)
    assert np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [14, 3, 13]
    assert np.array_equal(keep, balanced_subset(labels, 30, seed=5))


# --- augmentation --------------------------------------------------------------


def test_random_crop_flip_outputs_are_padded_crops_or_their_mirrors():
    pixels = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(pixels, 4, torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    flips = 0
    for i in range(16):
        matches = [
            flip
            for top, left, flip in itertools.product(range(9), range(9), (False, True))
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, top:top + 8, left:left + 8]))
        ]
        assert len(matches) == 1
        flips += matches[0]
    assert 0 < flips < 16


def test_augmented_rgb_loader_shapes_and_determinism():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    stats = ((0.5,) * 3, (0.25,) * 3)
    batches_a, batches_b = (
        list(TensorBatchLoader(images, labels, *stats, 16, shuffle=True, augment=True, seed=7)) for _ in range(2)
    )
    assert [tuple(x.shape) for x, _ in batches_a] == [(16, 3, 32, 32)] * 3 + [(2, 3, 32, 32)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain_x, plain_y = next(iter(TensorBatchLoader(images, labels, *stats, 16, shuffle=True, augment=False, seed=7)))
    assert torch.equal(batches_a[0][1], plain_y)  # same order with and without augmentation
    assert not torch.equal(batches_a[0][0], plain_x)  # augmentation changed pixels


def test_crop_flip_mode_on_28x28_moves_a_pixel_by_at_most_the_padding():
    # one bright pixel at row 5, column 9 of each 28x28 image; crop_padding 2 moves it by -2..2 rows and
    # columns, and a flip mirrors its column (27 - column)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 5, 9] = 255
    loader = TensorBatchLoader(images, torch.zeros(64, dtype=torch.int64), (0.0,), (1.0,), 64, shuffle=True,
                               augment=True, seed=3, crop_padding=2)
    assert loader.crop_padding == 2
    (batch, _), = list(loader)
    assert batch.shape == (64, 1, 28, 28)
    rows, cols, flips = set(), set(), 0
    for image in batch:
        where = (image[0] == 1.0).nonzero().tolist()
        assert len(where) == 1 and int((image != 0).sum()) == 1  # the pixel moved, nothing else appeared
        row, col = where[0]
        rows.add(row - 5)
        if col not in range(7, 12):
            flips += 1
            col = 27 - col
        cols.add(col - 9)
    assert rows == {-2, -1, 0, 1, 2} and cols == {-2, -1, 0, 1, 2}
    assert 20 < flips < 44  # about half of 64


def test_augment_default_is_bit_identical_and_crop_flip_is_opt_in(builtin):
    train, _, _ = builtin
    default = _all_batches(load_data("mnist-builtin", batch_size=256)[0])  # augment=True: MNIST-style -> none
    plain = _all_batches(load_data("mnist-builtin", batch_size=256, augment=False)[0])
    assert torch.equal(default[0], plain[0]) and torch.equal(default[1], plain[1])
    unaugmented = TensorBatchLoader(train.images, train.labels, train.mean, train.std, 256, shuffle=True,
                                    augment=False, seed=0)
    assert torch.equal(default[0], _all_batches(unaugmented)[0])
    assert default[0].shape == (12000, 1, 28, 28)
    cropped = load_data("mnist-builtin", batch_size=256, augment="crop_flip", crop_padding=2)[0]
    assert cropped.augment and cropped.crop_padding == 2
    images, labels = _all_batches(cropped)
    assert torch.equal(labels, default[1])  # same order, only the pixels move
    assert not torch.equal(images, default[0])
    # the CIFAR-style default keeps its 4-pixel padding: the loader's default equals an explicit 4
    rgb = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    stats = ((0.5,) * 3, (0.25,) * 3)
    a = _all_batches(TensorBatchLoader(rgb, torch.arange(20), *stats, 8, shuffle=True, augment=True, seed=1))
    b = _all_batches(TensorBatchLoader(rgb, torch.arange(20), *stats, 8, shuffle=True, augment=True, seed=1,
                                       crop_padding=4))
    assert torch.equal(a[0], b[0])
    with pytest.raises(UserError, match="augment must be true, false or 'crop_flip'"):
        load_data("mnist-builtin", augment="flip")


def test_calibration_batch_is_first_images_unaugmented(builtin):
    train, test, _ = builtin
    calib = calibration_batch(train, 100)
    assert calib.shape == (100, 1, 28, 28)
    assert torch.equal(calib, test.normalise(train.images[:100]))
    assert calibration_batch(train, 10**6).shape[0] == 12000
    generic = calibration_batch([(torch.zeros(4, 1, 2, 2), torch.zeros(4))] * 3, 10)
    assert generic.shape == (10, 1, 2, 2)


# --- user errors ----------------------------------------------------------------


def test_unknown_dataset_raises_with_name():
    with pytest.raises(UserError, match="svhn-extra"):
        load_data("svhn-extra")


def test_dataset_names_case_insensitive():
    assert "mnist-builtin" in DATASET_NAMES
    assert load_data("MNIST_Builtin", train_subset=10, test_subset=10)[2].name == "mnist-builtin"


def test_missing_data_dir_raises_with_name(tmp_path, monkeypatch):
    monkeypatch.delenv("SNNCOMPRESS_DATA", raising=False)
    with pytest.raises(UserError, match="'mnist'.*SNNCOMPRESS_DATA"):
        load_data("mnist")
    with pytest.raises(UserError, match="fashion-mnist.*does-not-exist"):
        load_data("fashion-mnist", str(tmp_path / "does-not-exist"))
    with pytest.raises(UserError, match="'mnist': no idx files"):
        load_data("mnist", str(tmp_path))
    with pytest.raises(UserError, match="cifar10-jpg"):
        load_data("cifar10-jpg", str(tmp_path))
    with pytest.raises(UserError, match="cifar100"):
        load_data("cifar100", str(tmp_path))
    with pytest.raises(UserError, match="no train/ folder"):
        load_data(f"imagefolder:{tmp_path / 'nothing'}")
    with pytest.raises(UserError, match="batch_size"):
        load_data("mnist-builtin", batch_size=0)


def test_test_batch_size():
    train, test, _ = load_data("mnist-builtin", batch_size=100, test_batch_size=1000)
    assert (len(train), len(test)) == (120, 2)
    assert next(iter(test))[0].shape == (1000, 1, 28, 28)


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv("SNNCOMPRESS_DATA", str(tmp_path / "b"))
    assert resolve_data_dir(str(tmp_path / "a")) == tmp_path / "a"
    assert resolve_data_dir(None) == tmp_path / "b"
    monkeypatch.delenv("SNNCOMPRESS_DATA")
    assert resolve_data_dir(None) is None


def test_corrupt_idx_file_raises(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8)
    with pytest.raises(UserError, match="truncated|missing"):
        load_data("mnist", str(tmp_path))


# --- CIFAR-10 JPEG copy (synthetic, fast) -----------------------------------------


def _jpeg_bytes(value: int, size=(32, 32)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 128)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_fake_cifar_tar(path: pathlib.Path) -> None:
    classes = [f"class{c}" for c in range(10)]
    with tarfile.open(path, "w") as archive:
        for split, per_class in (("train", 3), ("test", 1)):
            for c, name in enumerate(classes):
                for k in range(per_class):
                    payload = _jpeg_bytes(20 * c + k)
                    member = tarfile.TarInfo(f"{split}/{name}/{k:04d}.jpg")
                    member.size = len(payload)
                    archive.addfile(member, io.BytesIO(payload))


def test_cifar10_jpg_decodes_into_cache(tmp_path, monkeypatch):
    (tmp_path / "data" / "cifar10-jpg").mkdir(parents=True)
    _write_fake_cifar_tar(tmp_path / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar")
    monkeypatch.setenv("SNNCOMPRESS_CACHE", str(tmp_path / "cache"))
    train, test, info = load_data("cifar10-jpg", str(tmp_path / "data"), batch_size=8)
    assert (info.in_shape, info.num_classes, info.train_size, info.test_size) == ((3, 32, 32), 10, 30, 10)
    assert train.labels.tolist() == list(range(10)) * 3  # class-interleaved storage order
    assert test.labels.tolist() == list(range(10))
    # Red channel of class c, file k was 20c+k (JPEG rounding aside).
    assert abs(int(train.images[11, 0].float().mean()) - 21) <= 2
    assert len(list((tmp_path / "cache" / "cifar10-jpg").glob("*/*.npy"))) == 4
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.setattr(jpeg_cache, "_decode_entries", lambda *a: pytest.fail("decoded again despite cache"))
    again = load_data("cifar10-jpg", str(tmp_path / "data"))[0]
    assert torch.equal(again.images, train.images)
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


@pytest.mark.skipif(not (DATA_DIR and os.environ.get("SNNCOMPRESS_TEST_CIFAR_JPG")),
                    reason="set SNNCOMPRESS_DATA and SNNCOMPRESS_TEST_CIFAR_JPG=1 (full decode ~20 s)")
def test_cifar10_jpg_full_copy():
    train, test, info = load_data("cifar10-jpg", DATA_DIR)
    assert (info.train_size, info.test_size) == (50000, 10000)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    means = (train.images.float() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3)


# --- ImageFolder trees (synthetic) ---------------------------------------------------


def _write_png_tree(root: pathlib.Path, classes, per_class: int, size=(16, 16)) -> None:
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", size, (40 * c + k, 10 * k, 200)).save(root / name / f"{k}.png")


def test_imagefolder_loader(tmp_path):
    _write_png_tree(tmp_path / "tree" / "train", ["cat", "dog"], 5)
    _write_png_tree(tmp_path / "tree" / "test", ["cat", "dog"], 2)
    name = f"imagefolder:{tmp_path / 'tree'}"
    train, test, info = load_data(name, batch_size=4, seed=1)
    assert (info.in_shape, info.num_classes, info.train_size, info.test_size) == ((3, 16, 16), 2, 10, 4)
    assert (len(train), len(test)) == (3, 1)
    x1, y1 = next(iter(train))
    x2, y2 = next(iter(load_data(name, batch_size=4, seed=1)[0]))
    assert x1.shape == (4, 3, 16, 16) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert next(iter(test))[1].tolist() == [0, 1, 0, 1]  # class-interleaved
    assert calibration_batch(train, 3).shape == (3, 3, 16, 16)


def test_tiny_imagenet_val_annotations_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    for wnid in ("n01", "n02"):
        _write_png_tree(root / "train" / wnid, ["images"], 2, size=(64, 64))
    _write_png_tree(root / "val", ["images"], 2, size=(64, 64))
    (root / "val" / "val_annotations.txt").write_text("0.png\tn02\t0\t0\t1\t1\n1.png\tn01\t0\t0\t1\t1\n")
    train, test, info = load_data("tiny-imagenet", str(tmp_path), batch_size=8)
    assert (info.in_shape, info.num_classes, info.train_size, info.test_size) == ((3, 64, 64), 2, 4, 2)
    x, y = next(iter(test))
    assert x.shape == (2, 3, 64, 64) and sorted(y.tolist()) == [0, 1]


# --- offline data (SNNCOMPRESS_DATA) ------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "name, train_first, test_first",
    [
        ("mnist", [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]),
        ("fashion-mnist", [9, 0, 0, 3, 0, 2, 7, 2, 5, 5], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]),
    ],
)
def test_full_idx_datasets(name, train_first, test_first):
    train, test, info = load_data(name, DATA_DIR, batch_size=1000)
    assert (info.train_size, info.test_size, info.in_shape) == (60000, 10000, (1, 28, 28))
    assert (len(train), len(test)) == (60, 10)
    assert train.labels[:10].tolist() == train_first
    assert next(iter(test))[1][:10].tolist() == test_first


@needs_data
def test_builtin_subset_matches_its_recipe():
    train_images, train_labels, test_images, test_labels = data.read_mnist(DATA_DIR)
    builtin_train, builtin_test, _ = load_data("mnist-builtin")
    keep = balanced_subset(train_labels, 12000, seed=0)
    assert np.array_equal(builtin_train.images.numpy(), train_images[keep])
    keep = balanced_subset(test_labels, 2000, seed=0)
    assert np.array_equal(builtin_test.labels.numpy(), test_labels[keep])
