"""Training checkpoints: raw weights + spec + config + metrics + resume state, written atomically, loaded without pickle."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from inference.files import atomic_write
from inference.spec import ModelSpec
from training.models import build_model

CHECKPOINT_FORMAT = "visionserve-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"  # inside a run folder


class CheckpointError(Exception):
    """A file that is not a checkpoint this release can read; the message says why."""


@dataclass
class Checkpoint:
    spec: ModelSpec
    model_state: dict[str, torch.Tensor]  # the raw module's state dict (no `_orig_mod.` / `module.` prefixes)
    config: dict[str, Any]  # the resolved training config, JSON types only
    epoch: int  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per completed epoch
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics, e.g. test_accuracy in [0, 1]
    # Everything else a resumed run needs (optimizer, scheduler, RNG states, EMA weights), as
    # engine.TrainingState.state_dict() gives it; tensors and plain containers only, so that
    # torch.load(weights_only=True) can read it.
    training_state: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated_with_tta(self) -> bool:
        """Whether the run's test accuracy was measured with flip test-time augmentation (its --tta)."""
        return bool(self.config.get("tta", False))

    def build_model(self) -> nn.Module:
        """The trained model in eval mode, on the CPU."""
        model = build_model(self.spec.arch, self.spec.num_classes, self.spec.input_size, **self.spec.arch_kwargs)
        model.load_state_dict(self.model_state)
        return model.eval()


def raw_module(model: nn.Module) -> nn.Module:
    """The module under torch.compile / DataParallel wrappers, whose state-dict keys have no prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "spec": checkpoint.spec.to_dict(),
        "model_state": {k: v.detach().cpu() for k, v in checkpoint.model_state.items()},
        "config": checkpoint.config,
        "epoch": checkpoint.epoch,
        "history": checkpoint.history,
        "metrics": checkpoint.metrics,
        "training_state": checkpoint.training_state,
    }
    with atomic_write(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint with weights_only=True (no pickle code runs), refusing other formats clearly."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for foreign files
        raise CheckpointError(f"{path} is not a readable checkpoint: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (a bare state dict or another tool's file?)")
    if payload.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; "
            f"this release reads version {CHECKPOINT_VERSION}"
        )
    return Checkpoint(
        spec=ModelSpec.from_dict(payload["spec"]),
        model_state=payload["model_state"],
        config=payload["config"],
        epoch=int(payload["epoch"]),
        history=list(payload["history"]),
        metrics=dict(payload["metrics"]),
        training_state=dict(payload["training_state"]),
    )
