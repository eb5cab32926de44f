"""Training datasets: CIFAR-10 download, image folders and archives, decoded once into a cached uint8 array store.

A source is one string:
- "cifar10": torchvision's official download (needs internet) into `cache_dir/cifar10-official`;
- a folder holding train/<class>/*.{jpg,jpeg,png,webp} and test/<class>/...;
- a .tar, .tar.gz or .tgz of such a folder, read member by member (nothing is extracted to disk).
  Inside a folder or an archive the tree may be wrapped in one top directory.

Class names are the sorted class folder names (CIFAR-10's own order for "cifar10").
Every image is decoded once with `inference.imaging.decode_image` into (N, H, W, 3) uint8 arrays stored in
`cache_dir/<kind>-<key>-<H>x<W>.npz`, keyed by the source's content, so later runs load in seconds and a
changed source is decoded again. Unreadable or corrupt single images are skipped, not fatal: they are
listed in `ImageDataset.skipped` as (relative path, reason) and their count is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from inference.files import atomic_write
from inference.imaging import ImageDecodeError, decode_image, resize_to
from inference.package import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".mpo", ".png", ".webp", ".avif", ".heic", ".heif"}
)  # what decode_image accepts
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_FORMAT = "visionserve-images-v1"  # part of every cache key: bump it when the stored arrays change meaning
HASHES_FILE = "source-hashes.json"  # in cache_dir: sha256 of source files by (path, size, mtime)
DECODE_CHUNK = 512  # images per worker task
PARALLEL_MIN_IMAGES = 2048  # below this a process pool costs more than it saves


class DataError(Exception):
    """A dataset source that cannot be used; the message is one line naming the problem."""


@dataclass(frozen=True)
class ImageDataset:
    train_images: np.ndarray  # (N, H, W, 3) uint8 RGB
    train_labels: np.ndarray  # (N,) int64 indices into class_names
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    skipped: tuple[tuple[str, str], ...] = ()  # (path inside the source, decode failure reason)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[1:3])

    def select(self, class_names: Iterable[str], train_per_class: int | None = None, seed: int = 0) -> ImageDataset:
        """The subset of `class_names` (labels re-indexed to that order), with at most `train_per_class`
        training images per class drawn with `seed`; all their test images are kept. Dataset order is kept."""
        class_names = tuple(class_names)
        unknown = [name for name in class_names if name not in self.class_names]
        repeated = sorted({name for name in class_names if class_names.count(name) > 1})
        if not class_names:
            raise DataError("cannot select classes: none given")
        if unknown:
            raise DataError(
                f"cannot select classes: {unknown} not in the dataset, whose classes are {list(self.class_names)}"
            )
        if repeated:
            raise DataError(f"cannot select classes: {repeated} named more than once")
        if train_per_class is not None and train_per_class < 1:
            raise DataError(f"train_per_class must be at least 1, got {train_per_class}")
        rng = np.random.default_rng(seed)
        old_to_new = np.full(len(self.class_names), -1, dtype=np.int64)
        for new, name in enumerate(class_names):
            old_to_new[self.class_names.index(name)] = new

        train_keep = []
        for name in class_names:
            indices = np.flatnonzero(self.train_labels == self.class_names.index(name))
            if train_per_class is not None and len(indices) > train_per_class:
                indices = rng.choice(indices, size=train_per_class, replace=False)
            train_keep.append(indices)
        train_keep = np.sort(np.concatenate(train_keep))
        test_keep = np.flatnonzero(old_to_new[self.test_labels] >= 0)
        return replace(
            self,
            train_images=self.train_images[train_keep],
            train_labels=old_to_new[self.train_labels[train_keep]],
            test_images=self.test_images[test_keep],
            test_labels=old_to_new[self.test_labels[test_keep]],
            class_names=class_names,
        )


def load_dataset(
    source: str | Path,
    *,
    cache_dir: Path = Path(".cache/datasets"),
    image_size: tuple[int, int] = (32, 32),
) -> ImageDataset:
    """Load `source` ("cifar10", an image folder, or a .tar/.tar.gz/.tgz of one) as uint8 arrays of `image_size`."""
    source = str(source)
    cache_dir = Path(cache_dir)
    size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 1:
        raise DataError(f"image_size must be (height, width) > 0, got {image_size}")
    if source == "cifar10":
        return _load_cifar10(cache_dir, size)

    path = Path(source)
    kind = _source_kind(path)
    key = _short_hash(f"{CACHE_FORMAT}:{_CONTENT_HASHES[kind](path, cache_dir)}".encode())
    cache_file = cache_dir / f"{kind}-{key}-{size[0]}x{size[1]}.npz"
    cached = _read_cache(cache_file, source)
    if cached is not None:
        return cached
    images = _IMAGE_READERS[kind](path)  # [(relative posix path, encoded bytes)]
    dataset = _decode_tree(images, source, size)
    _write_cache(cache_file, dataset)
    return dataset


# ---- source kinds -------------------------------------------------------------------------------


def _source_kind(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if path.is_file():
        if path.name.lower().endswith(ARCHIVE_SUFFIXES):
            return "archive"
        raise DataError(f"{path} is not a .tar, .tar.gz or .tgz archive of an image folder")
    raise DataError(
        f"dataset source {path} does not exist; use 'cifar10', a folder with train/<class>/ and test/<class>/, "
        "or a .tar/.tar.gz/.tgz of one"
    )


def _list_folder(root: Path) -> list[tuple[str, int, int]]:
    """Image files under `root` as sorted (relative posix path, size in bytes, mtime in ns)."""
    files = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            stat = path.stat()
            files.append((path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(files)


def _folder_hash(root: Path, cache_dir: Path) -> str:
    """A folder's content, cheaply: the hash of its sorted image (path, size, mtime) listing."""
    return _short_hash(json.dumps(_list_folder(root)).encode())


def _archive_hash(path: Path, cache_dir: Path) -> str:
    return _file_sha256(path, cache_dir)


def _read_folder(root: Path) -> list[tuple[str, bytes]]:
    return [(relative, (root / relative).read_bytes()) for relative, _, _ in _list_folder(root)]


def _read_archive(path: Path) -> list[tuple[str, bytes]]:
    """Image members of a tar archive, read in one streaming pass; unsafe member names refuse the archive."""
    images = []
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                name = PurePosixPath(member.name)
                if name.is_absolute() or ".." in name.parts:
                    raise DataError(f"archive {path} has an unsafe member path {member.name!r}; refusing it")
                if member.isfile() and name.suffix.lower() in IMAGE_SUFFIXES:
                    images.append((name.as_posix(), archive.extractfile(member).read()))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"cannot read archive {path}: it is corrupt, truncated or not a tar ({exc})") from None
    return images


# Table dispatch over the on-disk kinds: a content hash (for the cache key), and the image bytes.
_CONTENT_HASHES: dict[str, Callable[[Path, Path], str]] = {
    "folder": _folder_hash,
    "archive": _archive_hash,
}
_IMAGE_READERS: dict[str, Callable[[Path], list[tuple[str, bytes]]]] = {
    "folder": _read_folder,
    "archive": _read_archive,
}


# ---- layout and decoding -----------------------------------------------------------------------


def _decode_tree(images: list[tuple[str, bytes]], source: str, size: tuple[int, int]) -> ImageDataset:
    """(relative path, bytes) of a train/<class>/ + test/<class>/ tree -> decoded dataset."""
    if not images:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {source}")
    entries = _split_class_entries(images)  # sorted [(split, class, path, bytes)]
    if not entries:
        raise DataError(f"{source} has images but none in train/<class>/ or test/<class>/")
    classes = {split: sorted({e[1] for e in entries if e[0] == split}) for split in SPLITS}
    for split in SPLITS:
        if not classes[split]:
            raise DataError(f"{source} has no {split}/ split (expected train/<class>/ and test/<class>/)")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataError(
            f"{source}: train/ and test/ have different classes (only in train: {only_train}, only in test: {only_test})"
        )
    if len(entries) < len(images):
        log.warning(
            "ignored %d image files outside train/<class>/ and test/<class>/",
            len(images) - len(entries),
        )
    class_names = tuple(classes["train"])

    pixels, failures = _decode_all([e[3] for e in entries], size)
    ok = np.ones(len(entries), dtype=bool)
    ok[[i for i, _ in failures]] = False
    skipped = tuple((entries[i][2], reason) for i, reason in failures)
    if skipped:
        log.warning(
            "skipped %d unreadable images in %s (first: %s, %s)",
            len(skipped),
            source,
            skipped[0][0],
            skipped[0][1],
        )
    labels = np.array([class_names.index(e[1]) for e in entries], dtype=np.int64)
    is_train = np.array([e[0] == "train" for e in entries])
    train, test = is_train[ok], ~is_train[ok]
    return ImageDataset(
        train_images=pixels[train],
        train_labels=labels[ok][train],
        test_images=pixels[test],
        test_labels=labels[ok][test],
        class_names=class_names,
        source=source,
        skipped=skipped,
    )


def _split_class_entries(images: list[tuple[str, bytes]]) -> list[tuple[str, str, str, bytes]]:
    """Keep split/class/file paths (below an optional single wrapping directory), sorted by (split, class, path)."""
    parts = [PurePosixPath(path).parts for path, _ in images]
    tops = {p[0] for p in parts}
    # Wrapped: one top directory for everything, with train/ or test/ under it.
    depth = 1 if len(tops) == 1 and not tops & set(SPLITS) and any(len(p) > 1 and p[1] in SPLITS for p in parts) else 0
    entries = []
    for p, (path, data) in zip(parts, images, strict=True):
        relative = p[depth:]
        if len(relative) == 3 and relative[0] in SPLITS:
            entries.append((relative[0], relative[1], path, data))
    return sorted(entries, key=lambda e: e[:3])


def _decode_all(blobs: list[bytes], size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode on every core in chunks -> ((n_ok, H, W, 3) uint8 in input order, [(index, failure reason)])."""
    chunks = [blobs[i : i + DECODE_CHUNK] for i in range(0, len(blobs), DECODE_CHUNK)]
    decode = partial(_decode_chunk, size=size)
    workers = os.cpu_count() or 1
    pixels, failures = [], []
    with tqdm(total=len(blobs), unit="img", desc="decoding images", disable=None) as progress:
        if len(blobs) >= PARALLEL_MIN_IMAGES and workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(_with_progress(pool.map(decode, chunks), progress))
        else:
            results = list(_with_progress(map(decode, chunks), progress))
    for start, (chunk_pixels, chunk_failures) in zip(range(0, len(blobs), DECODE_CHUNK), results, strict=True):
        pixels.append(chunk_pixels)
        failures.extend((start + i, reason) for i, reason in chunk_failures)
    return np.concatenate(pixels) if pixels else np.zeros((0, *size, 3), np.uint8), failures


def _with_progress(results, progress: tqdm):
    for chunk_pixels, chunk_failures in results:
        progress.update(len(chunk_pixels) + len(chunk_failures))
        yield chunk_pixels, chunk_failures


def _decode_chunk(blobs: list[bytes], size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    pixels, failures = [], []
    for i, data in enumerate(blobs):
        try:
            pixels.append(decode_image(data, size))
        except ImageDecodeError as exc:
            failures.append((i, exc.reason))
    return (np.stack(pixels) if pixels else np.zeros((0, *size, 3), np.uint8)), failures


# ---- CIFAR-10 official download -----------------------------------------------------------------


def _load_cifar10(cache_dir: Path, size: tuple[int, int]) -> ImageDataset:
    # torchvision is in the training extra only; folders and archives don't need it.
    from torchvision.datasets import CIFAR10

    root = cache_dir / "cifar10-official"
    try:
        train = CIFAR10(str(root), train=True, download=True)
        test = CIFAR10(str(root), train=False, download=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as exc:  # URLError is an OSError; integrity failures are RuntimeErrors
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"downloading CIFAR-10 into {root} failed ({reason}); offline, pass an image folder or a "
            ".tar.gz of one instead (e.g. cifar10-jpeg.tar.gz)"
        ) from None
    key = _short_hash(f"{CACHE_FORMAT}:{_file_sha256(root / CIFAR10.filename, cache_dir)}".encode())
    cache_file = cache_dir / f"cifar10-{key}-{size[0]}x{size[1]}.npz"
    cached = _read_cache(cache_file, "cifar10")
    if cached is not None:
        return cached
    dataset = ImageDataset(
        train_images=_resized(np.asarray(train.data, dtype=np.uint8), size),
        train_labels=np.asarray(train.targets, dtype=np.int64),
        test_images=_resized(np.asarray(test.data, dtype=np.uint8), size),
        test_labels=np.asarray(test.targets, dtype=np.int64),
        class_names=tuple(train.classes),
        source="cifar10",
    )
    _write_cache(cache_file, dataset)
    return dataset


def _resized(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if images.shape[1:3] == size:
        return images
    from PIL import Image

    return np.stack([resize_to(Image.fromarray(image), size) for image in tqdm(images, desc="resizing", disable=None)])


# ---- the array cache ----------------------------------------------------------------------------


def _read_cache(cache_file: Path, source: str) -> ImageDataset | None:
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as store:
            if str(store["format"]) != CACHE_FORMAT:
                return None
            dataset = ImageDataset(
                train_images=store["train_images"],
                train_labels=store["train_labels"],
                test_images=store["test_images"],
                test_labels=store["test_labels"],
                class_names=tuple(str(name) for name in store["class_names"]),
                source=source,
                skipped=tuple(
                    zip(
                        map(str, store["skipped_paths"]),
                        map(str, store["skipped_reasons"]),
                        strict=True,
                    )
                ),
            )
    except (OSError, KeyError, ValueError) as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable dataset cache %s (%s)", cache_file, exc)
        return None
    log.info("loaded %s from cache %s", source, cache_file)
    return dataset


def _write_cache(cache_file: Path, dataset: ImageDataset) -> None:
    """Uncompressed .npz (loads at disk speed), written to a temporary file and renamed into place."""
    arrays = {
        "format": np.array(CACHE_FORMAT),
        "train_images": dataset.train_images,
        "train_labels": dataset.train_labels,
        "test_images": dataset.test_images,
        "test_labels": dataset.test_labels,
        "class_names": np.array(dataset.class_names, dtype=str),
        "skipped_paths": np.array([path for path, _ in dataset.skipped], dtype=str),
        "skipped_reasons": np.array([reason for _, reason in dataset.skipped], dtype=str),
    }
    with atomic_write(cache_file) as f:
        np.savez(f, **arrays)


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file, remembered in cache_dir by (absolute path, size, mtime) so it is hashed once."""
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    hashes_file = cache_dir / HASHES_FILE
    try:
        known = json.loads(hashes_file.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path.resolve()))
    if isinstance(entry, dict) and {k: entry.get(k) for k in record} == record and "sha256" in entry:
        return entry["sha256"]
    digest = sha256_file(path)
    known[str(path.resolve())] = {**record, "sha256": digest}
    with atomic_write(hashes_file, "w") as f:
        f.write(json.dumps(known, indent=1))
    return digest


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
