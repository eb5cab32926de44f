"""The exported module: raw uint8 NHWC RGB pixels in, probabilities and logits out, normalisation inside."""

from __future__ import annotations

import torch
from torch import nn

from inference.spec import ModelSpec
from training.augment import flip_averaged_logits  # training's evaluation: the package serves what it measured


class ServingModule(nn.Module):
    """Wraps a trained classifier so that its graph starts at raw pixels, as the package's input contract says.

    pixels: uint8 (N, H, W, 3) RGB, already resized by inference.imaging.decode_image.
    returns: (probabilities, logits), each float32 (N, num_classes).
    With `flip_tta`, the logits are averaged over each image and its mirror, as training's evaluation does for
    a run trained with --tta: the package then serves the accuracy that the run reported.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, flip_tta: bool = False) -> None:
        super().__init__()
        self.model = model
        self.flip_tta = flip_tta
        self.input_size = tuple(spec.input_size)  # (H, W)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add on the 0..255 values.
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift  # (N, 3, H, W)
        logits = flip_averaged_logits(self.model, x) if self.flip_tta else self.model(x)
        return torch.softmax(logits, dim=1), logits


def serving_module(model: nn.Module, spec: ModelSpec, flip_tta: bool = False) -> ServingModule:
    """The eval-mode, CPU, float32 serving module of `model`."""
    return ServingModule(model.float().cpu(), spec, flip_tta).eval()
