"""Tiny training runs for export tests: a checkpoint (random or briefly fitted weights), its config, a synthetic image folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inference.spec import ModelSpec
from training.augment import to_model_input
from training.checkpoint import Checkpoint, save_checkpoint
from training.models import build_model, get_model_info, model_spec

CLASSES = ("red", "green", "blue")  # each class's images are dominated by that colour channel


def write_image_folder(root: Path, classes=CLASSES, size=(32, 32), train=8, test=12, seed=0) -> Path:
    """root/{train,test}/<class>/NNN.png: noisy images whose class's colour channel is the brightest; returns root."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 140, size=(*size, 3), dtype=np.uint8)
                pixels[..., index % 3] += rng.integers(60, 116, dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")
    return root


def write_run(
    run_dir: Path,
    arch: str,
    data: Path,
    classes=CLASSES,
    *,
    fit_steps: int = 0,
    seed: int = 0,
    tta: bool = False,
    normalisation: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
) -> Path:
    """A run folder as `python -m training train` leaves it (with `--tta` if asked), without the training engine.

    fit_steps=0 keeps random weights; more fits the model on data/train with plain SGD, so that its
    predictions are confident (int8 tests need that: random weights give near-uniform probabilities).
    `normalisation` (mean, std) replaces the registry's, as in a run whose spec recorded other statistics.
    """
    torch.manual_seed(seed)
    input_size = get_model_info(arch).input_size
    model = build_model(arch, len(classes), input_size)
    spec = model_spec(arch, classes, input_size)
    if normalisation is not None:
        spec = replace(spec, mean=normalisation[0], std=normalisation[1])
    if fit_steps:
        _fit(model, spec, data / "train", fit_steps)
    config = {
        "model": arch,
        "data": str(data),
        "out": str(run_dir),
        "cache_dir": str(run_dir.parent / "cache"),
        "tta": tta,
    }
    metrics = {
        "model": arch,
        "data": str(data),
        "epochs": 1,
        "test_accuracy": None,
        "class_names": list(classes),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        run_dir / "checkpoint.pt",
        Checkpoint(spec=spec, model_state=model.state_dict(), config=config, epoch=1, metrics=metrics),
    )
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def _fit(model: torch.nn.Module, spec: ModelSpec, train_dir: Path, steps: int) -> None:
    images, labels = [], []
    for label, name in enumerate(spec.class_names):
        for path in sorted((train_dir / name).glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    x = to_model_input(torch.from_numpy(np.stack(images)), spec.mean, spec.std)
    y = torch.tensor(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
