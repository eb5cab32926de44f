"""Tests for training.data: every source kind, the decoded-array cache, bad input and select()."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import urllib.error

import numpy as np
import pytest
from PIL import Image

import training.data as data
from inference.imaging import decode_image
from training.data import DataError, ImageDataset, load_dataset


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _forbid_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("decode_image was called although the cache should have been used")

    monkeypatch.setattr(data, "decode_image", fail)


def _count_decodes(monkeypatch) -> list[int]:
    calls = [0]

    def counting(blob, size):
        calls[0] += 1
        return decode_image(blob, size)

    monkeypatch.setattr(data, "decode_image", counting)
    return calls


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


# ---- sources -----------------------------------------------------------------------------------


def test_folder_source_decodes_every_image_with_sorted_class_names(tmp_path, image_tree_factory):
    root = image_tree_factory(tmp_path / "tree", classes=("dog", "cat", "bird"))
    ds = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))

    assert ds.class_names == ("bird", "cat", "dog")
    assert ds.train_images.shape == (9, 8, 8, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (6, 8, 8, 3)
    assert ds.train_labels.dtype == np.int64 and ds.test_labels.dtype == np.int64
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds.source == str(root) and ds.skipped == ()
    # Sorted by (split, class, file): the 4th training image is train/cat/000.png, pixel for pixel (PNG is lossless).
    np.testing.assert_array_equal(ds.train_images[3], _pixels(root / "train/cat/000.png"))
    np.testing.assert_array_equal(ds.test_images[-1], _pixels(root / "test/dog/001.png"))


def test_image_size_resizes_with_decode_image(tmp_path, image_tree_factory):
    root = image_tree_factory(tmp_path / "tree", size=(8, 8))
    ds = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(4, 6))
    assert ds.train_images.shape == (6, 4, 6, 3)
    expected = decode_image((root / "train/cat/000.png").read_bytes(), (4, 6))
    np.testing.assert_array_equal(ds.train_images[0], expected)


@pytest.mark.parametrize("archive_name", ["tree.tar", "tree.tar.gz", "tree.tgz"])
@pytest.mark.parametrize("top", ["", "cifar-mini"])
def test_archive_source_matches_the_folder_it_packs(
    tmp_path, image_tree_factory, tar_archive_factory, archive_name, top
):
    root = image_tree_factory(tmp_path / "tree")
    (root / "README.txt").write_text("not an image; ignored")
    archive = tar_archive_factory(root, tmp_path / archive_name, top=top)

    from_archive = load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    from_folder = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))

    assert from_archive.class_names == from_folder.class_names == ("cat", "dog")
    np.testing.assert_array_equal(from_archive.train_images, from_folder.train_images)
    np.testing.assert_array_equal(from_archive.test_labels, from_folder.test_labels)
    assert from_archive.source == str(archive)


class _FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10: writes its 'download' and holds tiny arrays."""

    filename = "cifar-10-python.tar.gz"
    classes = ["zebra", "ant"]  # deliberately not alphabetical: the source's order must be kept

    def __init__(self, root, train, download):
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, self.filename), "wb") as f:
            f.write(b"downloaded bytes")
        n = 4 if train else 2
        self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
        self.targets = [i % 2 for i in range(n)]


def test_cifar10_source_keeps_the_official_class_order_and_caches(tmp_path, monkeypatch):
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    ds = load_dataset("cifar10", cache_dir=tmp_path / "cache")

    assert ds.class_names == ("zebra", "ant") and ds.source == "cifar10"
    assert ds.train_images.shape == (4, 32, 32, 3) and ds.test_images.shape == (2, 32, 32, 3)
    assert ds.train_labels.tolist() == [0, 1, 0, 1]
    assert (tmp_path / "cache/cifar10-official" / _FakeCIFAR10.filename).is_file()
    assert len(list((tmp_path / "cache").glob("cifar10-*-32x32.npz"))) == 1

    resized = load_dataset("cifar10", cache_dir=tmp_path / "cache", image_size=(16, 16))
    assert resized.train_images.shape == (4, 16, 16, 3)


def test_cifar10_download_failure_is_a_one_line_error_suggesting_a_folder(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        filename = "cifar-10-python.tar.gz"

        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DataError) as excinfo:
        load_dataset("cifar10", cache_dir=tmp_path / "cache")
    message = _one_line_error(excinfo)
    assert "download" in message and "folder" in message


# ---- the cache ---------------------------------------------------------------------------------


def test_second_load_uses_the_cache_without_decoding(tmp_path, image_tree_factory, tar_archive_factory, monkeypatch):
    root = image_tree_factory(tmp_path / "tree")
    archive = tar_archive_factory(root, tmp_path / "tree.tar.gz")
    first_folder = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    first_archive = load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))

    _forbid_decoding(monkeypatch)
    again_folder = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    again_archive = load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))

    np.testing.assert_array_equal(again_folder.train_images, first_folder.train_images)
    np.testing.assert_array_equal(again_archive.test_labels, first_archive.test_labels)
    assert again_folder.class_names == first_folder.class_names
    assert {p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npz")} == {
        "folder",
        "archive",
    }
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_is_per_image_size(tmp_path, image_tree_factory, monkeypatch):
    root = image_tree_factory(tmp_path / "tree")
    load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    calls = _count_decodes(monkeypatch)
    assert load_dataset(root, cache_dir=tmp_path / "cache", image_size=(4, 4)).train_images.shape[1:3] == (4, 4)
    assert calls[0] == 10


def test_folder_cache_is_invalidated_when_an_image_changes(tmp_path, image_tree_factory, monkeypatch):
    root = image_tree_factory(tmp_path / "tree")
    load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    new_pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(new_pixels).save(root / "train/cat/000.png")

    calls = _count_decodes(monkeypatch)
    ds = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    assert calls[0] == 10
    np.testing.assert_array_equal(ds.train_images[0], new_pixels)


def test_archive_cache_is_invalidated_when_the_archive_changes(
    tmp_path, image_tree_factory, tar_archive_factory, monkeypatch
):
    archive = tar_archive_factory(image_tree_factory(tmp_path / "a", seed=1), tmp_path / "data.tgz")
    first = load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    tar_archive_factory(image_tree_factory(tmp_path / "b", seed=2), archive)  # same path, new content

    calls = _count_decodes(monkeypatch)
    second = load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    assert calls[0] == 10
    assert not np.array_equal(first.train_images, second.train_images)


def test_archive_hash_is_remembered_by_path_size_and_mtime(tmp_path, image_tree_factory, tar_archive_factory):
    archive = tar_archive_factory(image_tree_factory(tmp_path / "tree"), tmp_path / "data.tar")
    load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    hashes_file = tmp_path / "cache" / data.HASHES_FILE
    known = json.loads(hashes_file.read_text())
    record = known[str(archive.resolve())]
    assert record["size"] == archive.stat().st_size and len(record["sha256"]) == 64

    # A remembered hash is trusted while size and mtime match: a forged one changes the cache key...
    record["sha256"] = "0" * 64
    hashes_file.write_text(json.dumps(known))
    load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    assert len(list((tmp_path / "cache").glob("archive-*.npz"))) == 2
    # ...and is recomputed once the file's mtime changes.
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    load_dataset(archive, cache_dir=tmp_path / "cache", image_size=(8, 8))
    assert json.loads(hashes_file.read_text())[str(archive.resolve())]["sha256"] != "0" * 64


def test_damaged_cache_file_is_rebuilt(tmp_path, image_tree_factory):
    root = image_tree_factory(tmp_path / "tree")
    first = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    cache_file.write_bytes(b"truncated")
    again = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))
    np.testing.assert_array_equal(again.train_images, first.train_images)


# ---- bad input ---------------------------------------------------------------------------------


def _error(source, tmp_path) -> str:
    with pytest.raises(DataError) as excinfo:
        load_dataset(source, cache_dir=tmp_path / "cache")
    return _one_line_error(excinfo)


def test_missing_path(tmp_path):
    assert "does not exist" in _error(tmp_path / "nowhere", tmp_path)


def test_file_that_is_not_an_archive(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    assert ".tar.gz" in _error(tmp_path / "data.zip", tmp_path)


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 40])
def test_corrupt_or_empty_file_archive(tmp_path, content):
    (tmp_path / "data.tar.gz").write_bytes(content)
    assert "cannot read archive" in _error(tmp_path / "data.tar.gz", tmp_path)


def test_truncated_archive(tmp_path, image_tree_factory, tar_archive_factory):
    archive = tar_archive_factory(image_tree_factory(tmp_path / "tree", size=(32, 32)), tmp_path / "data.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert "corrupt, truncated" in _error(archive, tmp_path)


def test_archive_without_members(tmp_path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert "no image files" in _error(tmp_path / "empty.tar", tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "tree/train/cat").mkdir(parents=True)
    (tmp_path / "tree/train/cat/notes.txt").write_text("no pictures here")
    assert "no image files" in _error(tmp_path / "tree", tmp_path)


def test_train_and_test_class_mismatch(tmp_path, image_tree_factory):
    root = image_tree_factory(tmp_path / "tree")
    image_tree_factory(root, classes=("frog",), counts={"train": 1})
    message = _error(root, tmp_path)
    assert "different classes" in message and "frog" in message


@pytest.mark.parametrize("missing", ["train", "test"])
def test_missing_split(tmp_path, image_tree_factory, missing):
    kept = "test" if missing == "train" else "train"
    root = image_tree_factory(tmp_path / "tree", counts={kept: 2})
    assert f"no {missing}/ split" in _error(root, tmp_path)


def test_images_outside_the_layout(tmp_path, image_tree_factory):
    root = image_tree_factory(tmp_path / "tree", counts={"validation": 2})
    assert "none in train/<class>/" in _error(root, tmp_path)


@pytest.mark.parametrize("member_name", ["../escape.png", "train/cat/../../../escape.png", "/abs/train/cat/x.png"])
def test_unsafe_archive_member_refuses_the_archive(tmp_path, image_tree_factory, tar_archive_factory, member_name):
    archive = tar_archive_factory(image_tree_factory(tmp_path / "tree"), tmp_path / "data.tar")
    payload = (tmp_path / "tree/train/cat/000.png").read_bytes()
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo(member_name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    assert "unsafe member path" in _error(archive, tmp_path)


def test_unreadable_images_are_skipped_counted_and_logged(tmp_path, image_tree_factory, caplog):
    root = image_tree_factory(tmp_path / "tree")
    (root / "train/dog/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "test/cat/empty.png").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8))

    assert sorted(ds.skipped) == [("test/cat/empty.png", "empty"), ("train/dog/bad.jpg", "corrupt")]
    assert len(ds.train_images) == 6 and len(ds.test_images) == 4
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "skipped 2 unreadable images" in caplog.text
    assert sorted(load_dataset(root, cache_dir=tmp_path / "cache", image_size=(8, 8)).skipped) == sorted(ds.skipped)


# ---- select ------------------------------------------------------------------------------------


def _labelled_dataset() -> ImageDataset:
    # Image i is filled with the value i, so a selected image can be traced back.
    train_labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], dtype=np.int64)
    test_labels = np.array([2, 1, 0, 2], dtype=np.int64)
    return ImageDataset(
        train_images=np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3),
        train_labels=train_labels,
        test_images=np.arange(4, dtype=np.uint8).reshape(4, 1, 1, 1).repeat(3, axis=3),
        test_labels=test_labels,
        class_names=("cat", "dog", "frog"),
        source="synthetic",
    )


def test_select_reindexes_labels_to_the_new_class_order():
    subset = _labelled_dataset().select(["frog", "cat"])
    assert subset.class_names == ("frog", "cat")
    assert subset.train_images[:, 0, 0, 0].tolist() == [0, 2, 3, 5, 6, 8, 9]
    assert subset.train_labels.tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert subset.test_images[:, 0, 0, 0].tolist() == [0, 2, 3]
    assert subset.test_labels.tolist() == [0, 1, 0]


def test_select_limits_training_images_per_class_reproducibly():
    ds = _labelled_dataset()
    subset = ds.select(["cat", "dog"], train_per_class=2, seed=3)
    assert np.bincount(subset.train_labels).tolist() == [2, 2]
    assert subset.test_images[:, 0, 0, 0].tolist() == [1, 2]  # all their test images are kept
    again = ds.select(["cat", "dog"], train_per_class=2, seed=3)
    np.testing.assert_array_equal(subset.train_images, again.train_images)
    picks = {tuple(ds.select(["cat"], train_per_class=2, seed=s).train_images[:, 0, 0, 0]) for s in range(10)}
    assert len(picks) > 1  # the seed matters


@pytest.mark.parametrize(
    "bad, reason",
    [
        (["cat", "horse"], r"\['horse'\] not in the dataset"),
        ([], "none given"),
        (["cat", "cat"], r"\[.cat.\] named more than once"),
    ],
)
def test_select_refuses_unknown_or_repeated_classes(bad, reason):
    with pytest.raises(DataError, match=f"cannot select classes: {reason}"):
        _labelled_dataset().select(bad)


def test_parallel_decoding_keeps_order_and_failure_positions(tmp_path, image_tree_factory, monkeypatch):
    root = image_tree_factory(tmp_path / "tree", counts={"train": 4, "test": 3})
    (root / "train/dog/bad.png").write_bytes(b"garbage")
    serial = load_dataset(root, cache_dir=tmp_path / "serial", image_size=(8, 8))
    monkeypatch.setattr(data, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(data, "DECODE_CHUNK", 3)  # several chunks, the bad image in the middle of one
    parallel = load_dataset(root, cache_dir=tmp_path / "parallel", image_size=(8, 8))
    np.testing.assert_array_equal(parallel.train_images, serial.train_images)
    np.testing.assert_array_equal(parallel.train_labels, serial.train_labels)
    np.testing.assert_array_equal(parallel.test_images, serial.test_images)
    assert parallel.skipped == serial.skipped == (("train/dog/bad.png", "unsupported_format"),)
