"""Training test inputs: a learnable synthetic dataset, the image-folder tree it makes on disk, and a small config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from training.config import TrainConfig
from training.data import ImageDataset

REPO = Path(__file__).resolve().parents[2]


def tiny_dataset(classes=("cat", "dog", "ship"), per_class=16, test_per_class=4, size=32, seed=0) -> ImageDataset:
    """Random-noise images with a class-specific stripe pattern: learnable in a few steps, flip-invariant."""
    rng = np.random.default_rng(seed)

    def make(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(classes)), count)
        images = rng.integers(0, 60, size=(len(labels), size, size, 3), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, label :: len(classes)] += 150  # every len(classes)-th row, offset by the class
        return images, labels.astype(np.int64)

    train_images, train_labels = make(per_class)
    test_images, test_labels = make(test_per_class)
    return ImageDataset(train_images, train_labels, test_images, test_labels, tuple(classes), "synthetic")


def train_config(tmp_path: Path, name: str = "run", **changes) -> TrainConfig:
    """A quick cnn_bn run (2 epochs, batch 16) writing to tmp_path/name; `changes` override any field."""
    values = dict(
        model="cnn_bn", data="synthetic", out=str(tmp_path / name), epochs=2, batch_size=16, lr=0.05,
        progress=False,
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def write_image_tree(root: Path, data: ImageDataset) -> Path:
    """root/{train,test}/<class>/NNNN.png from `data`, as `--data <folder>` reads it; returns root."""
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):  # fmt: skip
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / data.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root
