"""Batched training augmentation and batch iteration: uint8 NHWC batches -> normalised float (N, 3, H, W) tensors.

Every transform draws per-sample parameters from the passed torch.Generator and runs as a few tensor ops
on the whole batch (no per-sample PIL), so it keeps up with training on two CPU cores and is reproducible
when a run resumes from the generator's saved state.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PREFETCH_BATCHES = 2  # batches prepared ahead by the background thread


def to_model_input(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 channels_last, (pixels / 255 - mean) / std."""
    # Permuting NHWC to NCHW gives channels_last strides already; float() keeps them.
    x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return _normalise(x, mean, std)


def flip_averaged_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the model's logits averaged over each image (N, 3, H, W) and its mirror."""
    return (model(x) + model(torch.flip(x, dims=[3]))) / 2


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] -> normalised, channels_last."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean_t).div_(std_t).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Augmenter:
    """The lesson's augmentation plus a padded random crop, per sample, on whole batches.

    In order: horizontal flip (p=0.5); one affine resampling for rotation (uniform in ±rotate_degrees),
    translation (whole pixels, uniform in ±translate of the size, like torchvision's RandomAffine) and
    random crop with zero padding `crop_padding` (a whole-pixel shift in ±crop_padding, equivalent to
    RandomCrop(size, padding)); areas moved in from outside are black, as torchvision fills them;
    brightness then contrast factors uniform in [1 - b, 1 + b] (ColorJitter's definitions, clamped to [0, 1]);
    then (x - mean) / std. A zero setting turns its transform off.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    flip: bool = True
    rotate_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    translate: float = 0.1  # fraction of the width / height
    crop_padding: int = 4  # pixels

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 channels_last, augmented and normalised."""
        n, height, width = images.shape[0], images.shape[1], images.shape[2]
        x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)  # (N, 3, H, W) in [0, 1]

        def uniform(low: float, high: float) -> torch.Tensor:  # (N,) per-sample values
            u = torch.rand(n, generator=generator, device=generator.device)
            return (low + (high - low) * u).to(x.device)

        flipped = (uniform(0, 1) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        if self.rotate_degrees or self.translate or self.crop_padding:
            angle = uniform(-self.rotate_degrees, self.rotate_degrees) * (math.pi / 180)
            # Whole-pixel shifts, like torchvision's RandomAffine (rounded) and RandomCrop (integer offsets).
            max_dx, max_dy = self.translate * width, self.translate * height
            crop = self.crop_padding
            shift_x = uniform(-max_dx, max_dx).round() + _integer_shift(n, crop, generator, x.device)
            shift_y = uniform(-max_dy, max_dy).round() + _integer_shift(n, crop, generator, x.device)
            # The flip rides along in the same resampling (cheaper than a separate masked flip).
            x = _affine(x, angle, shift_x, shift_y, flipped.to(x.device))
        elif self.flip:
            x = torch.where(flipped.to(x.device).view(n, 1, 1, 1), x.flip(3), x)

        if self.brightness:
            x = x.mul_(uniform(1 - self.brightness, 1 + self.brightness).view(n, 1, 1, 1)).clamp_(0, 1)
        if self.contrast:
            # ColorJitter blends with the mean of the grayscale image (ITU-R 601-2 luma weights).
            luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            grey_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            factor = uniform(1 - self.contrast, 1 + self.contrast).view(n, 1, 1, 1)
            x = x.sub_(grey_mean).mul_(factor).add_(grey_mean).clamp_(0, 1)
        return _normalise(x, self.mean, self.std)


def _integer_shift(n: int, padding: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(N,) whole-pixel offsets uniform in [-padding, padding] (zeros when padding is 0)."""
    if not padding:
        return torch.zeros(n, device=device)
    offsets = torch.randint(-padding, padding + 1, (n,), generator=generator, device=generator.device)
    return offsets.to(device=device, dtype=torch.float32)


def _affine(
    x: torch.Tensor,
    angle: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
    flipped: torch.Tensor,
) -> torch.Tensor:
    """Mirror the `flipped` (N,) bool images horizontally, rotate each by `angle` (radians) about its centre,
    then shift it by (shift_x, shift_y) pixels: one affine_grid + grid_sample for the whole batch.

    grid_sample maps output to input coordinates, normalised to [-1, 1] per axis (align_corners=False),
    so the inverse transform is built in pixels and rescaled: p_in = F R(-angle) (p_out - shift), where
    F negates x for flipped images (pixel centres map onto pixel centres, so a flip alone is exact).
    """
    n, _, height, width = x.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = sin * (height / width)
    theta[:, 1, 0] = -sin * (width / height)
    theta[:, 1, 1] = cos
    # Shift in normalised units: one pixel is 2 / width horizontally, 2 / height vertically.
    sx, sy = shift_x * (2 / width), shift_y * (2 / height)
    theta[:, 0, 2] = -(theta[:, 0, 0] * sx + theta[:, 0, 1] * sy)
    theta[:, 1, 2] = -(theta[:, 1, 0] * sx + theta[:, 1, 1] * sy)
    theta[:, 0] *= torch.where(flipped, -1.0, 1.0).view(n, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def iterate_batches(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator,
    augmenter: Augmenter | None = None,
    drop_last: bool = False,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x (B, 3, H, W) float32 channels_last, y (B,) int64) batches on `device`, prepared in a
    background thread. Each batch moves to `device` as uint8, before augmentation: a quarter of float32's bytes,
    and on a GPU the augmentation arithmetic runs there (one CPU thread augments about 11,500 images/s on this
    project's machine; an H100 trained airbench at about 61,000 with the augmentation on the GPU).

    The epoch's order and one augmentation seed are drawn from `generator` when this is called, so the
    batches depend only on the generator's state then, and `generator` advances by the same amount
    whatever the thread timing. Without an augmenter, images are only normalised with mean/std.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if augmenter is not None and (tuple(augmenter.mean), tuple(augmenter.std)) != (
        tuple(mean),
        tuple(std),
    ):
        raise ValueError("the augmenter normalises with a different mean/std than iterate_batches was given")
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(labels) != len(images):
        raise ValueError(f"expected (N, H, W, 3) uint8 images and N labels, got {tuple(images.shape)} {images.dtype}")
    n = len(images)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    batch_indices = [order[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size)]
    return _prefetched(images, labels, batch_indices, augmenter, seed, mean, std, torch.device(device))


def _prefetched(images, labels, batch_indices, augmenter, seed, mean, std, device):
    augment_generator = torch.Generator().manual_seed(seed)  # owned by the worker thread alone
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    cancelled = threading.Event()
    done = object()

    def put(item) -> bool:
        while not cancelled.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for indices in batch_indices:
                batch = images[indices].to(device)
                x = augmenter(batch, augment_generator) if augmenter else to_model_input(batch, mean, std)
                if not put((x, labels[indices].to(device))):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()  # an abandoned epoch (break, exception) stops the worker
        worker.join()
