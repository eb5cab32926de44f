"""Transfer learning: load a pretrained backbone (torchvision ImageNet weights, a state-dict file or one of our
checkpoints) under a new random head, and freeze it or fine-tune it."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from inference.package import sha256_file
from training.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from training.config import TrainingError

# Registry name -> torchvision weights enum member; fetched with the weights API (downloads once into
# torch.hub's cache; offline users pass a local file instead).
IMAGENET_WEIGHTS = {
    "resnet18_transfer": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50_transfer": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
}


class TransferError(TrainingError):
    """Pretrained weights that cannot be used: missing, wrong checksum, wrong architecture."""


def head_name(model: nn.Module) -> str:
    """The classifier head: the model's last nn.Linear (torchvision ResNets' `fc`, our models' last layer)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise TransferError(f"{type(model).__name__} has no linear classifier head to replace")
    return names[-1]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.get_submodule(head_name(model)).parameters())


def load_pretrained(
    model: nn.Module, arch: str, source: str, *, sha256: str | None = None, progress: bool = True
) -> str:
    """Load the backbone weights named by `source` into `model` (its head stays random); returns where they came from.

    `source` is "imagenet" or a path to a state-dict file or a training checkpoint of the same architecture.
    """
    if source == "imagenet":
        if arch not in IMAGENET_WEIGHTS:
            raise TransferError(f"model {arch!r} has no ImageNet weights; valid: {', '.join(IMAGENET_WEIGHTS)}")
        weights = IMAGENET_WEIGHTS[arch]
        try:
            state = weights.get_state_dict(progress=progress)
        except OSError as exc:  # URLError is an OSError: no network, proxy, DNS...
            raise TransferError(
                f"cannot download {weights} ({exc}); offline, pass --pretrained PATH to a local state-dict file"
            ) from None
        _load_backbone(model, state, f"torchvision {weights}")
        return f"imagenet (torchvision {weights.name})"

    path = Path(source)
    if not path.is_file():
        raise TransferError(f"pretrained weights file {path} does not exist (or pass --pretrained imagenet)")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256.lower():
        raise TransferError(f"pretrained weights file {path} has sha256 {digest}, expected {sha256.lower()}")
    state, origin = _read_weights(path, arch)
    _load_backbone(model, state, str(path))
    return f"{origin} sha256:{digest}"


def _read_weights(path: Path, arch: str) -> tuple[dict[str, torch.Tensor], str]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for foreign files
        raise TransferError(f"{path} is not a readable weights file: {type(exc).__name__}: {str(exc)[:200]}") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as exc:
            raise TransferError(str(exc)) from None
        if checkpoint.spec.arch != arch:
            raise TransferError(f"checkpoint {path} holds a {checkpoint.spec.arch!r} model, not {arch!r}")
        return (
            checkpoint.model_state,
            f"checkpoint {path.name} ({checkpoint.spec.arch}, epoch {checkpoint.epoch})",
        )
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise TransferError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    return payload, "file"


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Copy every non-head tensor from `state`; the key sets must match exactly and the shapes agree."""
    head = head_name(model) + "."
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise TransferError(
            f"weights from {origin} do not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    wrong = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if given[k].shape != v.shape
    ]
    if wrong:
        raise TransferError(f"weights from {origin} have other shapes: {', '.join(wrong[:3])}")
    model.load_state_dict(given, strict=False)


def freeze_backbone(model: nn.Module) -> None:
    """Only the head trains. The engine keeps BN layers without trainable parameters in eval mode, so the
    backbone's running statistics do not drift either (see engine.set_train_mode)."""
    head_ids = {id(p) for p in head_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in head_ids)
