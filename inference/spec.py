"""The model spec: the frozen contract (architecture, classes, input size, normalisation) that travels with the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# ImageNet's statistics: what a spec naming no normalisation means, and what pretrained torchvision ResNets expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Everything downstream needs to feed a model correctly; written into checkpoints, exported files and manifests.

    Exported graphs take raw pixels: uint8, (N, H, W, 3), RGB, already resized to `input_size`
    by `inference.imaging.decode_image`; scaling to [0, 1] and (x - mean) / std happen inside the graph.
    """

    arch: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int] = (32, 32)  # (H, W) in pixels
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per RGB channel on [0, 1] pixels; training sets the registry's
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = "NHWC-uint8-RGB"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments of `arch`

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("a model spec needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class names must be unique, got {list(self.class_names)}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (height, width) > 0, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std > 0")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types only (lists, not tuples), so it can sit in a weights_only checkpoint."""
        d = asdict(self)
        for key in ("class_names", "input_size", "mean", "std"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {"arch", "class_names", "input_size", "mean", "std", "layout", "arch_kwargs"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec fields: {sorted(unknown)}")
        return cls(
            arch=str(d["arch"]),
            class_names=tuple(str(c) for c in d["class_names"]),
            input_size=tuple(int(v) for v in d.get("input_size", (32, 32))),
            mean=tuple(float(v) for v in d.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in d.get("std", IMAGENET_STD)),
            layout=str(d.get("layout", "NHWC-uint8-RGB")),
            arch_kwargs=dict(d.get("arch_kwargs", {})),
        )
