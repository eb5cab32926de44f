"""Tests for training.augment: model input, batched per-sample augmentation, and the prefetching batch iterator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference.spec import IMAGENET_MEAN, IMAGENET_STD
from training.augment import Augmenter, _affine, iterate_batches, to_model_input

NO_FLIP = torch.zeros(2, dtype=torch.bool)
OFF = dict(flip=False, rotate_degrees=0, brightness=0, contrast=0, translate=0, crop_padding=0)


def _images(n: int = 8, size=(32, 32), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=g)


def _augmenter(**settings) -> Augmenter:
    return Augmenter(IMAGENET_MEAN, IMAGENET_STD, **{**OFF, **settings})


def _manual_input(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).double() / 255 - mean.double()) / std.double()


def test_to_model_input_normalises_into_channels_last_float32():
    images = _images(4, size=(5, 7))
    x = to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)
    assert x.shape == (4, 3, 5, 7) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.double(), _manual_input(images), atol=1e-6, rtol=0)


def test_augmenter_output_is_normalised_channels_last_float32():
    images = _images(16)
    x = Augmenter(IMAGENET_MEAN, IMAGENET_STD)(images, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    lowest = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    highest = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lowest - 1e-5).all() and (per_channel.max(1).values <= highest + 1e-5).all()


def test_everything_off_equals_plain_model_input():
    images = _images(4)
    x = _augmenter()(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, to_model_input(images, IMAGENET_MEAN, IMAGENET_STD))


def test_flip_only_equals_a_manual_flip_of_some_samples():
    images = _images(64)
    x = _augmenter(flip=True)(images, torch.Generator().manual_seed(0))
    plain = to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)
    flipped = plain.flip(3)
    is_flipped = [torch.equal(x[i], flipped[i]) for i in range(64)]
    is_plain = [torch.equal(x[i], plain[i]) for i in range(64)]
    assert all(a or b for a, b in zip(is_flipped, is_plain, strict=True))
    assert 10 < sum(is_flipped) < 54  # p = 0.5 per sample


def test_crop_only_is_a_whole_pixel_shift_with_black_padding():
    images = _images(32, size=(12, 12))
    x = _augmenter(crop_padding=4)(images, torch.Generator().manual_seed(0))
    plain = images.permute(0, 3, 1, 2).float() / 255
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    black = to_model_input(torch.zeros(1, 1, 1, 3, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD)
    assert black.shape == (1, 3, 1, 1)
    offsets = set()
    for i in range(32):
        matches = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if torch.allclose(
                _normalised(padded[i : i + 1, :, top : top + 12, left : left + 12]),
                x[i : i + 1],
                atol=1e-5,
            )
        ]
        assert matches, f"sample {i} is not a padded crop of its input"
        offsets.add(matches[0])
    assert len(offsets) > 5  # per-sample offsets


def _normalised(x01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def test_affine_rotates_about_the_centre_and_shifts_by_pixels():
    x = torch.rand(2, 3, 6, 6)
    quarter = torch.full((2,), math.pi / 2)
    rotated = _affine(x, quarter, torch.zeros(2), torch.zeros(2), NO_FLIP)
    # A quarter turn of a square image resamples exactly onto the pixel grid, as rot90 in one direction.
    assert torch.allclose(rotated, x.rot90(1, (2, 3)), atol=1e-5) or torch.allclose(
        rotated, x.rot90(-1, (2, 3)), atol=1e-5
    )
    shifted = _affine(x, torch.zeros(2), torch.tensor([2.0, 0.0]), torch.tensor([0.0, -1.0]), NO_FLIP)
    torch.testing.assert_close(shifted[0, :, :, 2:], x[0, :, :, :-2], atol=1e-5, rtol=0)
    assert shifted[0, :, :, :2].abs().max() < 1e-6  # moved in from outside: black
    torch.testing.assert_close(shifted[1, :, :-1, :], x[1, :, 1:, :], atol=1e-5, rtol=0)
    flipped = torch.tensor([True, False])
    mirrored = _affine(x, torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2), flipped)
    # Flipped first, then shifted one pixel right; the unflipped sample is untouched.
    torch.testing.assert_close(mirrored[0, :, :, 1:], x[0].flip(2)[:, :, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mirrored[1], x[1], atol=1e-5, rtol=0)


def test_flip_inside_the_combined_resampling_mirrors_some_samples():
    images = _images(64, size=(8, 8))
    x = _augmenter(flip=True, crop_padding=1)(images, torch.Generator().manual_seed(0))
    plain = images.permute(0, 3, 1, 2).float() / 255
    kinds = []
    for i in range(64):
        found = set()
        for name, source in (("plain", plain[i : i + 1]), ("flipped", plain[i : i + 1].flip(3))):
            padded = torch.nn.functional.pad(source, (1, 1, 1, 1))
            for top in range(3):
                for left in range(3):
                    crop = _normalised(padded[:, :, top : top + 8, left : left + 8])
                    if torch.allclose(crop, x[i : i + 1], atol=1e-5):
                        found.add(name)
        kinds.append(found)
    assert all(kinds), "every sample is a padded crop of the image or of its mirror"
    assert 10 < sum("flipped" in k for k in kinds) < 54


def test_brightness_only_scales_each_sample_by_its_own_factor():
    images = torch.full((16, 4, 4, 3), 100, dtype=torch.uint8)
    x = _augmenter(brightness=0.2)(images, torch.Generator().manual_seed(0))
    ratio = (x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / (
        100 / 255
    )
    per_sample = ratio.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-4)  # one factor per image
    assert per_sample.min() >= 0.8 - 1e-4 and per_sample.max() <= 1.2 + 1e-4
    assert per_sample[:, 0].unique().numel() == 16


def test_contrast_only_keeps_the_grey_mean_and_scales_deviations():
    images = _images(8)
    x = _augmenter(contrast=0.2)(images, torch.Generator().manual_seed(0))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out01 = x * std + mean
    in01 = images.permute(0, 3, 1, 2).float() / 255
    grey_in = (in01 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3))
    for i in range(8):
        deviation_in = (in01[i] - grey_in[i].view(1, 1, 1)).flatten()
        deviation_out = (out01[i] - grey_in[i].view(1, 1, 1)).flatten()
        unclipped = (out01[i].flatten() > 1e-4) & (out01[i].flatten() < 1 - 1e-4)
        factor = deviation_out[unclipped] / deviation_in[unclipped]
        factor = factor[deviation_in[unclipped].abs() > 0.05]
        assert 0.8 - 1e-3 <= factor.median() <= 1.2 + 1e-3
        assert torch.allclose(factor, factor.median().expand_as(factor), atol=1e-3)


def test_each_sample_gets_its_own_transform():
    one_image = _images(1).expand(32, -1, -1, -1).contiguous()
    x = Augmenter(IMAGENET_MEAN, IMAGENET_STD)(one_image, torch.Generator().manual_seed(0))
    distinct = {tuple(x[i].flatten()[:64].tolist()) for i in range(32)}
    assert len(distinct) == 32


def test_same_generator_state_gives_the_same_batch():
    images = _images(16)
    augment = Augmenter(IMAGENET_MEAN, IMAGENET_STD)
    first = augment(images, torch.Generator().manual_seed(7))
    again = augment(images, torch.Generator().manual_seed(7))
    other = augment(images, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


# ---- iterate_batches ---------------------------------------------------------------------------


def _numbered(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i is filled with i % 256 and labelled i, so batches can be traced back."""
    images = (np.arange(n) % 256).astype(np.uint8).reshape(n, 1, 1, 1).repeat(4, 1).repeat(4, 2).repeat(3, 3)
    return images, np.arange(n, dtype=np.int64)


def _batches(images, labels, batch_size, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"shuffle": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **kwargs}
    return list(iterate_batches(images, labels, batch_size, generator=generator, **kwargs))


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch(drop_last):
    images, labels = _numbered(103)
    batches = _batches(images, labels, 10, seed=0, drop_last=drop_last)
    seen = torch.cat([y for _, y in batches]).tolist()
    assert [len(y) for _, y in batches] == [10] * 10 + ([] if drop_last else [3])
    if drop_last:
        assert len(set(seen)) == 100
    else:
        assert sorted(seen) == list(range(103))
    assert seen != sorted(seen)  # shuffled
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 4, 4)
        torch.testing.assert_close(x, to_model_input(torch.as_tensor(images[y.numpy()]), IMAGENET_MEAN, IMAGENET_STD))


def test_without_shuffle_keeps_dataset_order():
    images, labels = _numbered(25)
    seen = torch.cat([y for _, y in _batches(images, labels, 8, seed=0, shuffle=False)]).tolist()
    assert seen == list(range(25))


def test_batches_are_deterministic_given_the_generator_state():
    images, labels = _numbered(64)
    augmenter = Augmenter(IMAGENET_MEAN, IMAGENET_STD)
    first = _batches(images, labels, 16, seed=5, augmenter=augmenter)
    again = _batches(images, labels, 16, seed=5, augmenter=augmenter)
    other = _batches(images, labels, 16, seed=6, augmenter=augmenter)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, other, strict=True))


def test_a_resumed_epoch_matches_from_the_saved_generator_state():
    images, labels = _numbered(40)
    augmenter = Augmenter(IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator().manual_seed(1)
    list(iterate_batches(images, labels, 8, shuffle=True, generator=generator, augmenter=augmenter,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD))  # fmt: skip
    saved = generator.get_state()
    epoch_two = list(iterate_batches(images, labels, 8, shuffle=True, generator=generator, augmenter=augmenter,
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD))  # fmt: skip
    resumed = torch.Generator()
    resumed.set_state(saved)
    replay = list(iterate_batches(images, labels, 8, shuffle=True, generator=resumed, augmenter=augmenter,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD))  # fmt: skip
    for (x1, y1), (x2, y2) in zip(epoch_two, replay, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_stopping_early_ends_the_prefetch_thread():
    images, labels = _numbered(200)
    batches = iterate_batches(images, labels, 4, shuffle=False, generator=torch.Generator(),
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)  # fmt: skip
    for _ in zip(range(2), batches, strict=False):
        pass
    batches.close()  # what a `break` out of a for loop does when the iterator is dropped
    import threading

    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_errors_in_the_prefetch_thread_reach_the_consumer():
    images, labels = _numbered(16)

    class BrokenAugmenter(Augmenter):
        def __call__(self, images, generator):
            raise RuntimeError("augmentation failed")

    with pytest.raises(RuntimeError, match="augmentation failed"):
        _batches(images, labels, 4, seed=0, augmenter=BrokenAugmenter(IMAGENET_MEAN, IMAGENET_STD))


def test_mismatched_normalisation_is_refused():
    images, labels = _numbered(4)
    with pytest.raises(ValueError, match="mean/std"):
        _batches(images, labels, 2, seed=0, augmenter=Augmenter((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_are_augmented_on_the_gpu_as_on_the_cpu():
    images, labels = _images(64).numpy(), np.arange(64, dtype=np.int64)
    full = dict(flip=True, rotate_degrees=10, brightness=0.2, contrast=0.2, translate=0.1, crop_padding=4)
    augmenter = _augmenter(**full)
    on_cpu = _batches(images, labels, 16, seed=3, augmenter=augmenter)
    on_gpu = _batches(images, labels, 16, seed=3, augmenter=augmenter, device="cuda")
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(on_cpu, on_gpu, strict=True):
        assert x_gpu.is_cuda and y_gpu.is_cuda
        # Same draws from the same generator; only the arithmetic's rounding differs between the devices.
        torch.testing.assert_close(x_gpu.cpu(), x_cpu, atol=1e-3, rtol=0)
        assert torch.equal(y_gpu.cpu(), y_cpu)
