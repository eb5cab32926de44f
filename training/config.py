"""The training configuration: one frozen dataclass, validated once, saved beside every run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from training.models import get_model_info

SCHEDULES = ("cosine", "onecycle", "step", "constant")  # implemented in training.optim
OPTIMIZERS = ("sgd", "adamw", "adam")
TRANSFER_MODES = ("finetune", "frozen")
DEVICES = ("auto", "cuda", "cpu")

# Fields a resumed run may change: where and how fast it runs, and how long (--epochs extends a run).
# `out` too: the same folder may be named by another (relative or absolute) path.
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "device", "num_threads", "progress", "cache_dir", "out"})


class TrainingError(Exception):
    """A training problem the user can fix; the message is one line and says how."""


class ConfigError(TrainingError):
    """A TrainConfig that cannot run (bad value, unknown name, incompatible resume)."""


@dataclass(frozen=True)
class TrainConfig:
    model: str  # a name in training.models' registry
    data: str  # "cifar10", an image folder, or an archive of one (see training.data.load_dataset)
    out: str  # the run folder
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05  # peak learning rate, reached at the end of warmup
    weight_decay: float = 5e-4  # never applied to BN or bias parameters
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    nesterov: bool = False
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: bool = True
    # Augmentation strengths (training.augment.Augmenter's); 0 (or --no-flip) turns one transform off.
    flip: bool = True
    rotate_degrees: float = 10.0
    translate: float = 0.1  # fraction of the width / height
    crop_padding: int = 4  # pixels
    brightness: float = 0.2
    contrast: float = 0.2
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bfloat16 autocast for training steps: CUDA, or a CPU with AMX / AVX512-BF16
    channels_last: bool = True
    input_size: tuple[int, int] | None = None  # (H, W); None -> the model's default
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. airbench widths
    ema: bool = False  # evaluate (and export) an exponential moving average of the weights
    ema_decay: float = 0.995  # per optimizer step
    tta: bool = False  # average logits over the image and its horizontal flip when evaluating
    bn_bias_lr_scale: float = 1.0  # airbench trains BN biases at a higher learning rate
    pretrained: str | None = None  # "imagenet", a state-dict file or one of our checkpoints
    pretrained_sha256: str | None = None
    mode: str = "finetune"  # with --pretrained: "frozen" trains only the new head
    backbone_lr_scale: float = 0.1  # finetune: backbone lr = lr * this
    num_threads: int | None = None  # torch CPU threads; None leaves torch's default
    train_per_class: int | None = None  # few-label subsets: this many training images per class
    classes: tuple[str, ...] | None = None  # train on these classes only, in this order
    cache_dir: str = ".cache/datasets"
    resume: bool = False
    progress: bool = True  # tqdm bars on stderr
    recipe: str | None = None  # the training.recipes preset the run started from, for the record

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (lists, not tuples): for config.json and the checkpoint."""
        d = dataclasses.asdict(self)
        for key in ("input_size", "classes"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown training config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("input_size", "classes"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: str, valid: tuple[str, ...]) -> None:
    _require(value in valid, f"unknown {name} {value!r}; valid: {', '.join(valid)}")


def validate(config: TrainConfig) -> None:
    try:
        info = get_model_info(config.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _one_of("optimizer", config.optimizer, OPTIMIZERS)
    _one_of("schedule", config.schedule, SCHEDULES)
    _one_of("mode", config.mode, TRANSFER_MODES)
    _one_of("device", config.device, DEVICES)
    _require(config.epochs >= 1, f"epochs must be at least 1, got {config.epochs}")
    _require(config.batch_size >= 1, f"batch size must be at least 1, got {config.batch_size}")
    _require(config.lr > 0, f"learning rate must be > 0, got {config.lr}")
    _require(config.weight_decay >= 0, f"weight decay must be >= 0, got {config.weight_decay}")
    _require(0 <= config.momentum < 1, f"momentum must be in [0, 1), got {config.momentum}")
    _require(config.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {config.warmup_epochs}")
    _require(
        0 <= config.label_smoothing < 1,
        f"label smoothing must be in [0, 1), got {config.label_smoothing}",
    )
    for name in ("rotate_degrees", "translate", "crop_padding", "brightness", "contrast"):
        value = getattr(config, name)
        _require(value >= 0, f"{name.replace('_', ' ')} must be >= 0, got {value}")
    _require(config.translate < 1, f"translate must be < 1 (of the size), got {config.translate}")
    _require(config.brightness < 1, f"brightness must be < 1, got {config.brightness}")
    _require(config.contrast < 1, f"contrast must be < 1, got {config.contrast}")
    _require(0 < config.ema_decay < 1, f"EMA decay must be in (0, 1), got {config.ema_decay}")
    _require(config.bn_bias_lr_scale > 0, "BN bias lr scale must be > 0")
    _require(config.backbone_lr_scale > 0, "backbone lr scale must be > 0")
    if config.input_size is not None:
        _require(
            len(config.input_size) == 2 and min(config.input_size) >= 8,
            f"input size must be (height, width) of at least 8 pixels, got {config.input_size}",
        )
    if config.num_threads is not None:
        _require(config.num_threads >= 1, f"num threads must be at least 1, got {config.num_threads}")
    if config.train_per_class is not None:
        _require(
            config.train_per_class >= 1,
            f"train per class must be at least 1, got {config.train_per_class}",
        )
    if config.classes is not None:
        _require(len(config.classes) >= 2, "--classes needs at least two class names")
    if config.pretrained is None:
        _require(
            config.mode == "finetune",
            "--mode frozen needs --pretrained (there is no backbone to freeze)",
        )
        _require(config.pretrained_sha256 is None, "--pretrained-sha256 needs --pretrained")
    elif config.pretrained == "imagenet":
        _require(info.transfer, f"model {config.model!r} has no ImageNet weights; use a *_transfer model")
    if config.pretrained_sha256 is not None:
        digest = config.pretrained_sha256.lower()
        _require(
            len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
            "--pretrained-sha256 must be 64 hex digits",
        )


def resumed_config(saved: dict[str, Any], changes: dict[str, Any]) -> TrainConfig:
    """The saved run's config with `changes` applied; only RESUMABLE_CHANGES may differ from what was saved."""
    saved_config = TrainConfig.from_dict(saved)
    merged = saved_config.replace(**changes)
    check_resumable(saved_config, merged)
    return merged


def check_resumable(saved: TrainConfig, requested: TrainConfig) -> None:
    old, new = saved.to_dict(), requested.to_dict()
    differences = [
        f"{k}={old[k]!r} (run) vs {new[k]!r} (now)" for k in old if k not in RESUMABLE_CHANGES and old[k] != new[k]
    ]
    _require(
        not differences,
        f"cannot resume {saved.out} with a different config: {'; '.join(differences)}; "
        "only --epochs, --device, --num-threads and --cache-dir may change",
    )
