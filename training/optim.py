"""Optimisers, parameter groups and per-iteration learning-rate schedules, chosen by name."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from training.config import ConfigError, TrainConfig

# Parameters of these layers (scale and shift) get no weight decay, like biases.
_NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    head: Iterable[nn.Parameter] = (),
    backbone_lr_scale: float = 1.0,
    bn_bias_lr_scale: float = 1.0,
) -> list[dict]:
    """The trainable parameters, grouped by (learning rate, weight decay); each appears exactly once.

    - BN/norm parameters and biases: no weight decay.
    - With a non-empty `head` (fine-tuning a pretrained backbone): every other parameter trains at
      lr * backbone_lr_scale. Membership is by identity (id()), never `p in params`, which compares
      tensors elementwise.
    - BN biases: lr * bn_bias_lr_scale (airbench trains them faster).
    Each group records its `lr_scale`; the schedule multiplies `lr` (the group's initial lr) over time.
    """
    head_ids = {id(p) for p in head}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_norm = isinstance(module, _NORM_LAYERS)
            decay = 0.0 if is_norm or name == "bias" else weight_decay
            scale = 1.0 if not head_ids or id(param) in head_ids else backbone_lr_scale
            if is_norm and name == "bias":
                scale *= bn_bias_lr_scale
            groups.setdefault((scale, decay), []).append(param)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    return [
        {"params": params, "lr": lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), params in sorted(groups.items())
    ]


def _sgd(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def _adamw(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def _adam(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    # Adam's weight_decay is L2 in the gradient, not decoupled: the groups' values still apply.
    return torch.optim.Adam(groups, lr=config.lr, betas=(config.momentum, 0.999))


OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "adam": _adam,
}


def build_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    try:
        make = OPTIMIZERS[config.optimizer]
    except KeyError:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}") from None
    return make(groups, config)


# Decay shapes after warmup: progress in [0, 1] -> lr factor.
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _onecycle(progress: float) -> float:
    # The linear ("triangular") one-cycle of airbench and fast.ai: warmup up to the peak, then straight down to 0.
    return 1.0 - progress


def _step(progress: float) -> float:
    # x0.1 at half and again at three quarters of the post-warmup steps (the classic ResNet recipe).
    return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))


def _constant(progress: float) -> float:
    return 1.0


SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine": _cosine,
    "onecycle": _onecycle,
    "step": _step,
    "constant": _constant,
}


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """The multiplier on each group's initial lr before optimizer step `step` (0-based).

    Linear warmup from 1/warmup_steps up to 1 over the first `warmup_steps` steps, then the named decay.
    """
    try:
        decay = SCHEDULES[schedule]
    except KeyError:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}") from None
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return decay(min(1.0, (step - warmup_steps) / decay_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration schedule over config.epochs (call scheduler.step() after every optimizer step)."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config.schedule, step, total_steps, warmup_steps)
    )
