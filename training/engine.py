"""The training loop: train(config) runs epochs of train_one_epoch + evaluate, checkpointing after each one."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from inference.files import atomic_write
from inference.spec import ModelSpec
from training import optim, transfer
from training.augment import Augmenter, flip_averaged_logits, iterate_batches, to_model_input
from training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    load_checkpoint,
    raw_module,
    save_checkpoint,
)
from training.config import ConfigError, TrainConfig, TrainingError, check_resumable
from training.data import ImageDataset, load_dataset
from training.models import build_model, get_model_info, model_spec

log = logging.getLogger(__name__)

HISTORY_FIELDS = (
    "epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
    "train_images_per_second",
)  # fmt: skip
WHITENING_IMAGES = 5000  # training images that set a data-dependent stem (airbench's whitening)


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy (no label smoothing)
    accuracy: float  # in [0, 1]
    probabilities: np.ndarray  # (N, C) float32


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    config: TrainConfig
    spec: ModelSpec
    model: nn.Module  # the evaluated weights (the EMA when config.ema), eval mode, on the CPU
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    evaluation: Evaluation  # of the final model on the test split
    test_images: np.ndarray  # (N, H, W, 3) uint8
    test_labels: np.ndarray  # (N,) int64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    return torch.device(name)


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 autocast speeds training up on `device`: any CUDA GPU, or a CPU with AMX or AVX512-BF16
    instructions; elsewhere it would emulate bfloat16."""
    if device.type == "cuda":
        return True
    try:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    except AttributeError:  # a torch without these probes: stay in float32
        return False


def ema_update(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)) after n
    updates, so that a short run's average is not dominated by the random initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (BN's num_batches_tracked) follow the live model
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except BN layers with nothing left to train (a frozen backbone) stay in eval mode,
    so their running statistics do not drift."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    amp: bool = False,
    ema: AveragedModel | None = None,
    channels_last: bool = True,
    num_batches: int | None = None,
    description: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over `batches` ((B, 3, H, W) float, (B,) int64), stepping the optimizer and the
    per-iteration schedule (and the EMA) after every batch. Returns train_loss, train_accuracy, images, seconds."""
    set_train_mode(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    total_loss = torch.zeros((), device=device)  # summed on the device: no sync per batch
    total_correct = torch.zeros((), device=device, dtype=torch.long)
    images = 0
    start = time.perf_counter()
    bar = tqdm(
        batches,
        total=num_batches,
        desc=description,
        unit="batch",
        disable=not progress,
        leave=False,
    )
    for step, (x, y) in enumerate(bar):
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total_loss += loss.detach() * len(y)
        total_correct += (logits.argmax(1) == y).sum()
        images += len(y)
        if progress and (step % 10 == 0 or step + 1 == num_batches):
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{total_loss.item() / images:.3f}",
                acc=f"{total_correct.item() / images:.3f}",
                img_s=f"{images / elapsed:.0f}",
            )
    bar.close()
    if images == 0:
        raise TrainingError("the training split yielded no batches")
    train_loss = total_loss.item() / images
    if not math.isfinite(train_loss):
        raise TrainingError(f"the training loss became {train_loss}; try a lower --lr")
    return {
        "train_loss": train_loss,
        "train_accuracy": total_correct.item() / images,
        "images": images,
        "seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    tta: bool = False,
    progress: bool = False,
) -> Evaluation:
    """Accuracy and loss on decoded uint8 images (N, H, W, 3), fed through augment.to_model_input like
    exported models' in-graph normalisation. With `tta`, logits are averaged over each image and its mirror.
    Always in float32, even after mixed-precision training: the exported models run in float32."""
    device = torch.device(device)
    model.eval()
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    all_logits = []
    for start in tqdm(range(0, len(images), batch_size), desc="evaluate", disable=not progress, leave=False):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        x = to_model_input(pixels.to(device), mean, std)  # uint8 moves: a quarter of the bytes
        logits = flip_averaged_logits(model, x) if tta else model(x)
        all_logits.append(logits.cpu())
    if not all_logits:
        raise TrainingError("the test split is empty")
    logits = torch.cat(all_logits)
    return Evaluation(
        loss=nn.functional.cross_entropy(logits, labels_t).item(),
        accuracy=(logits.argmax(1) == labels_t).sum().item() / len(labels_t),
        probabilities=torch.softmax(logits, dim=1).numpy(),
    )


def evaluate_run(
    run: str | Path,
    data: str,
    *,
    cache_dir: Path = Path(".cache/datasets"),
    device: str = "auto",
    tta: bool | None = None,
    batch_size: int = 500,
) -> tuple[Evaluation, Checkpoint, int]:
    """Evaluate a run's checkpoint on `data`'s test split (decoded at the model's input size, restricted to its
    classes); tta=None follows the run's config. Returns (evaluation, checkpoint, number of test images)."""
    checkpoint = load_checkpoint(run)
    spec = checkpoint.spec
    dataset = load_dataset(data, cache_dir=cache_dir, image_size=spec.input_size)
    if dataset.class_names != spec.class_names:
        dataset = dataset.select(spec.class_names)
    target = resolve_device(device)
    model = checkpoint.build_model().to(target, memory_format=torch.channels_last)
    evaluation = evaluate(
        model, dataset.test_images, dataset.test_labels, mean=spec.mean, std=spec.std, device=target,
        batch_size=batch_size, tta=checkpoint.evaluated_with_tta if tta is None else tta,
    )  # fmt: skip
    return evaluation, checkpoint, len(dataset.test_labels)


def prepare_dataset(config: TrainConfig, input_size: tuple[int, int]) -> ImageDataset:
    dataset = load_dataset(config.data, cache_dir=Path(config.cache_dir), image_size=input_size)
    if config.classes is not None or config.train_per_class is not None:
        dataset = dataset.select(config.classes or dataset.class_names, config.train_per_class, seed=config.seed)
    return dataset


@dataclass
class TrainingState:
    """What a run changes as it trains and a resume must restore: the live weights, the EMA, the optimizer and
    its schedule, the data-order and global RNG states, the completed epochs' history and the training time.

    state_dict() gives the checkpoint fields model_state (the evaluated weights: the EMA when there is one),
    epoch, history and training_state (tensors and plain containers only); load_state_dict() takes them back.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # data order and augmentation
    device: torch.device
    ema: AveragedModel | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # one HISTORY_FIELDS row per completed epoch
    train_seconds: float = 0.0

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.history)

    @property
    def evaluated(self) -> nn.Module:
        """The weights that are evaluated, checkpointed and exported."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        resume = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "train_seconds": self.train_seconds,
        }
        if self.device.type == "cuda":
            resume["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.ema is not None:  # model_state holds the EMA, so the live weights and the EMA's count go here
            resume["live_model_state"] = {k: v.detach().cpu() for k, v in raw_module(self.model).state_dict().items()}
            resume["ema_updates"] = self.ema.n_averaged.detach().cpu()
        return {
            "model_state": raw_module(self.evaluated).state_dict(),
            "epoch": self.epoch,
            "history": list(self.history),
            "training_state": resume,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        resume = state["training_state"]
        if self.ema is not None:
            self.model.load_state_dict(resume["live_model_state"])
            self.ema.module.load_state_dict(state["model_state"])
            self.ema.n_averaged.copy_(resume["ema_updates"])
        else:
            self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        self.generator.set_state(resume["data_generator"])
        torch.set_rng_state(resume["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in resume:
            torch.cuda.set_rng_state(resume["cuda_rng"], self.device)
        self.history = list(state["history"])
        self.train_seconds = float(resume.get("train_seconds", 0.0))


@dataclass(frozen=True)
class RunSetup:
    """What stays fixed through a run: its config, device, data, spec, and how batches are made and scored."""

    config: TrainConfig
    device: torch.device
    amp: bool  # bfloat16 autocast for the training steps
    dataset: ImageDataset
    spec: ModelSpec
    pretrained: str | None  # where the initial weights came from
    loss_fn: nn.Module
    augmenter: Augmenter | None
    drop_last: bool
    steps_per_epoch: int

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)


def train(
    config: TrainConfig,
    *,
    dataset: ImageDataset | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train `config.model` on `config.data` into the run folder `config.out`, checkpointing every epoch.

    With config.resume the run continues from config.out's checkpoint (same config except RESUMABLE_CHANGES)
    and ends exactly where an uninterrupted run would. `dataset` overrides loading config.data (tests);
    `on_epoch_end(epoch, history_row)` is called after each epoch's checkpoint is written.
    """
    config, resumed = _open_run(config)
    device, amp = _select_device(config)
    dataset = _training_data(config, dataset)
    spec = _model_spec(config, dataset, resumed)
    model, pretrained = _initial_model(config, spec, dataset, resumed)
    run = _run_setup(config, device, amp, dataset, spec, pretrained)
    state = _new_state(run, model)
    if resumed is not None:
        _resume(run, state, resumed)
    _start_run_folder(run)
    evaluation = None
    for epoch in range(state.epoch + 1, config.epochs + 1):
        evaluation = _train_epoch(run, state, epoch)
        _end_epoch(run, state, evaluation)
        if on_epoch_end is not None:
            on_epoch_end(epoch, state.history[-1])
    return _finish(run, state, evaluation)


def _open_run(config: TrainConfig) -> tuple[TrainConfig, Checkpoint | None]:
    """The config with its input size resolved, and the checkpoint to resume from (None for a fresh run)."""
    input_size = tuple(config.input_size or get_model_info(config.model).input_size)
    config = config.replace(input_size=input_size)  # the resolved config is what gets saved
    checkpoint_path = Path(config.out) / CHECKPOINT_NAME
    if not config.resume:
        if checkpoint_path.exists():
            raise TrainingError(
                f"{config.out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        return config, None
    if not checkpoint_path.is_file():
        raise TrainingError(f"cannot resume: no checkpoint at {checkpoint_path}")
    resumed = load_checkpoint(checkpoint_path)
    check_resumable(TrainConfig.from_dict(resumed.config), config)
    return config, resumed


def _select_device(config: TrainConfig) -> tuple[torch.device, bool]:
    """The device to train on and whether its training steps use bfloat16 autocast."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN times its kernels once and keeps the fastest
    amp = config.amp and native_bfloat16(device)
    if config.amp and not amp:
        log.warning("--amp needs a CUDA GPU or a CPU with native bfloat16 (AMX, AVX512-BF16); float32 on %s", device)
    return device, amp


def _training_data(config: TrainConfig, dataset: ImageDataset | None) -> ImageDataset:
    if dataset is None:
        dataset = prepare_dataset(config, config.input_size)
    if dataset.image_size != config.input_size:
        raise TrainingError(f"the dataset's images are {dataset.image_size}, the model expects {config.input_size}")
    return dataset


def _model_spec(config: TrainConfig, dataset: ImageDataset, resumed: Checkpoint | None) -> ModelSpec:
    """The registry's spec for the model; a resumed run keeps the normalisation it was trained with."""
    spec = model_spec(config.model, dataset.class_names, config.input_size, config.arch_kwargs)
    if resumed is not None:
        spec = replace(spec, mean=resumed.spec.mean, std=resumed.spec.std)
    return spec


def _initial_model(
    config: TrainConfig, spec: ModelSpec, dataset: ImageDataset, resumed: Checkpoint | None
) -> tuple[nn.Module, str | None]:
    """The model before training (seeded init, pretrained backbone, frozen or not, data-dependent stem) and
    where its weights came from. A resumed run's weights are loaded later, with the optimizer's state."""
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, spec.num_classes, spec.input_size, **config.arch_kwargs)
    except TypeError as exc:  # an arch kwarg the constructor does not take
        raise ConfigError(f"model {config.model!r} cannot be built with {config.arch_kwargs}: {exc}") from None
    if config.pretrained is not None and config.mode == "frozen":
        transfer.freeze_backbone(model)
    if resumed is not None:
        return model, resumed.metrics.get("pretrained")
    pretrained = None
    if config.pretrained is not None:
        pretrained = transfer.load_pretrained(
            model,
            config.model,
            config.pretrained,
            sha256=config.pretrained_sha256,
            progress=config.progress,
        )
    if hasattr(model, "init_from_data"):  # e.g. airbench's patch-whitening stem
        sample = torch.from_numpy(dataset.train_images[:WHITENING_IMAGES])
        model.init_from_data(to_model_input(sample, spec.mean, spec.std))
    return model, pretrained


def _run_setup(
    config: TrainConfig,
    device: torch.device,
    amp: bool,
    dataset: ImageDataset,
    spec: ModelSpec,
    pretrained: str | None,
) -> RunSetup:
    num_train = len(dataset.train_labels)
    # BN needs full batches: drop the short last one, unless the subset is smaller than one batch.
    drop_last = num_train >= config.batch_size
    augmenter = None
    if config.augment:
        augmenter = Augmenter(
            spec.mean, spec.std, flip=config.flip, rotate_degrees=config.rotate_degrees,
            brightness=config.brightness, contrast=config.contrast, translate=config.translate,
            crop_padding=config.crop_padding,
        )  # fmt: skip
    return RunSetup(
        config=config,
        device=device,
        amp=amp,
        dataset=dataset,
        spec=spec,
        pretrained=pretrained,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        augmenter=augmenter,
        drop_last=drop_last,
        steps_per_epoch=max(1, num_train // config.batch_size) if drop_last else 1,
    )


def _new_state(run: RunSetup, model: nn.Module) -> TrainingState:
    """The model on the run's device with a fresh optimizer, schedule, EMA and seeded data generator."""
    config = run.config
    model.to(run.device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    finetune = config.pretrained is not None and config.mode == "finetune"
    groups = optim.param_groups(
        model,
        lr=config.lr,
        weight_decay=config.weight_decay,
        head=transfer.head_parameters(model) if finetune else (),
        backbone_lr_scale=config.backbone_lr_scale,
        bn_bias_lr_scale=config.bn_bias_lr_scale,
    )
    optimizer = optim.build_optimizer(groups, config)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=optim.build_scheduler(optimizer, config, run.steps_per_epoch),
        generator=torch.Generator().manual_seed(config.seed),
        device=run.device,
        ema=AveragedModel(model, multi_avg_fn=ema_update(config.ema_decay), use_buffers=True) if config.ema else None,
    )


def _resume(run: RunSetup, state: TrainingState, checkpoint: Checkpoint) -> None:
    state.load_state_dict(
        {
            "model_state": checkpoint.model_state,
            "epoch": checkpoint.epoch,
            "history": checkpoint.history,
            "training_state": checkpoint.training_state,
        }
    )
    log.info("resuming %s after epoch %d of %d", run.run_dir, state.epoch, run.config.epochs)


def _start_run_folder(run: RunSetup) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.run_dir / "config.json", run.config.to_dict())


def _train_epoch(run: RunSetup, state: TrainingState, epoch: int) -> Evaluation:
    """One epoch of training, then the evaluation of the result; appends the epoch's history row."""
    config, dataset, spec = run.config, run.dataset, run.spec
    batches = iterate_batches(
        dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True, generator=state.generator,
        augmenter=run.augmenter, drop_last=run.drop_last, mean=spec.mean, std=spec.std, device=run.device,
    )  # fmt: skip
    stats = train_one_epoch(
        state.model, batches, optimizer=state.optimizer, scheduler=state.scheduler, loss_fn=run.loss_fn,
        device=run.device, amp=run.amp, ema=state.ema, channels_last=config.channels_last,
        num_batches=run.steps_per_epoch, description=f"epoch {epoch}/{config.epochs}", progress=config.progress,
    )  # fmt: skip
    evaluation = _evaluate(run, state)
    epoch_seconds = stats["seconds"]
    state.train_seconds += epoch_seconds
    state.history.append(
        {
            "epoch": epoch,
            "lr": _last_lr(config, state.scheduler, run.steps_per_epoch),
            "train_loss": stats["train_loss"],
            "train_accuracy": stats["train_accuracy"],
            "test_loss": evaluation.loss,
            "test_accuracy": evaluation.accuracy,
            "epoch_seconds": epoch_seconds,
            "train_images_per_second": stats["images"] / epoch_seconds,
        }
    )
    return evaluation


def _evaluate(run: RunSetup, state: TrainingState) -> Evaluation:
    return evaluate(
        state.evaluated, run.dataset.test_images, run.dataset.test_labels, mean=run.spec.mean, std=run.spec.std,
        device=run.device, tta=run.config.tta,
    )  # fmt: skip


def _end_epoch(run: RunSetup, state: TrainingState, evaluation: Evaluation) -> None:
    """Checkpoint the state, write the history files and log the epoch."""
    checkpoint = Checkpoint(
        spec=run.spec, config=run.config.to_dict(), metrics=_metrics(run, state, evaluation), **state.state_dict()
    )
    save_checkpoint(run.run_dir / CHECKPOINT_NAME, checkpoint)
    write_history(run.run_dir, state.history)
    row = state.history[-1]
    log.info(
        "epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %.1f s",
        row["epoch"], run.config.epochs, row["train_loss"], row["train_accuracy"], row["test_loss"],
        row["test_accuracy"], row["epoch_seconds"],
    )  # fmt: skip


def _finish(run: RunSetup, state: TrainingState, evaluation: Evaluation | None) -> RunResult:
    """Write metrics.json and hand back the evaluated model, on the CPU."""
    if evaluation is None:  # resumed a run that had already finished: report it as it stands
        evaluation = _evaluate(run, state)
    metrics = _metrics(run, state, evaluation)
    write_json_atomic(run.run_dir / "metrics.json", metrics)
    final = raw_module(state.evaluated).to("cpu").eval()
    return RunResult(
        run.run_dir,
        run.config,
        run.spec,
        final,
        state.history,
        metrics,
        evaluation,
        run.dataset.test_images,
        run.dataset.test_labels,
    )


def _last_lr(config: TrainConfig, scheduler: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int) -> float:
    """The base learning rate (lr_scale 1) of the last step taken."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return config.lr * optim.lr_factor(config.schedule, scheduler.last_epoch - 1, total, warmup)


def _metrics(run: RunSetup, state: TrainingState, evaluation: Evaluation) -> dict[str, Any]:
    config, dataset = run.config, run.dataset
    return {
        "model": config.model,
        "data": config.data,
        "epochs": state.epoch,
        "test_accuracy": evaluation.accuracy,
        "test_loss": evaluation.loss,
        "train_seconds": state.train_seconds,
        "parameters": sum(p.numel() for p in raw_module(state.evaluated).parameters()),
        "class_names": list(dataset.class_names),
        "pretrained": run.pretrained,
        "train_images": len(dataset.train_labels),
        "test_images": len(dataset.test_labels),
        "device": str(run.device),
        "precision": "bfloat16 autocast" if run.amp else "float32",  # of the training steps; evaluation is float32
        "ema": config.ema,
        "tta": config.tta,
    }


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """history.json and history.csv: one row per epoch, columns HISTORY_FIELDS."""
    write_json_atomic(run_dir / "history.json", history)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in HISTORY_FIELDS} for row in history)
    write_text_atomic(run_dir / "history.csv", buffer.getvalue())


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
