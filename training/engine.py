"""The training loop: train(config) runs epochs of train_one_epoch + evaluate, checkpointing after each one."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from training.models import build_model, get_model_info

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
    instructions (1.5x to 2x faster training steps on this machine's Xeon); elsewhere it would emulate bfloat16."""
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
    run_dir, input_size = Path(config.out), config.input_size
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN times its kernels once and keeps the fastest
    amp = config.amp and native_bfloat16(device)
    if config.amp and not amp:
        log.warning("--amp needs a CUDA GPU or a CPU with native bfloat16 (AMX, AVX512-BF16); float32 on %s", device)

    if dataset is None:
        dataset = prepare_dataset(config, input_size)
    if dataset.image_size != input_size:
        raise TrainingError(f"the dataset's images are {dataset.image_size}, the model expects {input_size}")
    spec = ModelSpec(
        arch=config.model,
        class_names=dataset.class_names,
        input_size=input_size,
        arch_kwargs=config.arch_kwargs,
    )

    model, pretrained = _initial_model(config, spec, dataset, resumed)
    model.to(
        device,
        memory_format=torch.channels_last if config.channels_last else torch.contiguous_format,
    )

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
    num_train = len(dataset.train_labels)
    # BN needs full batches: drop the short last one, unless the subset is smaller than one batch.
    drop_last = num_train >= config.batch_size
    steps_per_epoch = max(1, num_train // config.batch_size) if drop_last else 1
    scheduler = optim.build_scheduler(optimizer, config, steps_per_epoch)
    ema = AveragedModel(model, multi_avg_fn=ema_update(config.ema_decay), use_buffers=True) if config.ema else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = torch.Generator().manual_seed(config.seed)  # data order and augmentation
    augmenter = None
    if config.augment:
        augmenter = Augmenter(
            spec.mean, spec.std, flip=config.flip, rotate_degrees=config.rotate_degrees,
            brightness=config.brightness, contrast=config.contrast, translate=config.translate,
            crop_padding=config.crop_padding,
        )  # fmt: skip

    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    if resumed is not None:
        _restore(resumed, model, ema, optimizer, scheduler, generator, device)
        history = list(resumed.history)
        train_seconds = float(resumed.training_state.get("train_seconds", 0.0))
        log.info("resuming %s after epoch %d of %d", run_dir, resumed.epoch, config.epochs)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", config.to_dict())

    evaluated = ema.module if ema is not None else model
    evaluation = None
    for epoch in range(len(history) + 1, config.epochs + 1):
        batches = iterate_batches(
            dataset.train_images, dataset.train_labels, config.batch_size, shuffle=True, generator=generator,
            augmenter=augmenter, drop_last=drop_last, mean=spec.mean, std=spec.std, device=device,
        )  # fmt: skip
        stats = train_one_epoch(
            model, batches, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, device=device, amp=amp,
            ema=ema, channels_last=config.channels_last, num_batches=steps_per_epoch,
            description=f"epoch {epoch}/{config.epochs}", progress=config.progress,
        )  # fmt: skip
        evaluation = evaluate(
            evaluated, dataset.test_images, dataset.test_labels, mean=spec.mean, std=spec.std, device=device,
            tta=config.tta,
        )  # fmt: skip
        epoch_seconds = stats["seconds"]
        train_seconds += epoch_seconds
        row = {
            "epoch": epoch,
            "lr": _last_lr(config, scheduler, steps_per_epoch),
            "train_loss": stats["train_loss"],
            "train_accuracy": stats["train_accuracy"],
            "test_loss": evaluation.loss,
            "test_accuracy": evaluation.accuracy,
            "epoch_seconds": epoch_seconds,
            "train_images_per_second": stats["images"] / epoch_seconds,
        }
        history.append(row)
        metrics = _metrics(config, dataset, evaluated, evaluation, epoch, train_seconds, pretrained, device, amp)
        save_checkpoint(
            run_dir / CHECKPOINT_NAME,
            Checkpoint(
                spec=spec,
                model_state=raw_module(evaluated).state_dict(),
                config=config.to_dict(),
                epoch=epoch,
                history=history,
                metrics=metrics,
                training_state=_training_state(model, ema, optimizer, scheduler, generator, device, train_seconds),
            ),
        )
        write_history(run_dir, history)
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f, test loss %.4f acc %.4f, %.1f s",
            epoch, config.epochs, row["train_loss"], row["train_accuracy"], row["test_loss"], row["test_accuracy"],
            epoch_seconds,
        )  # fmt: skip
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)

    if evaluation is None:  # resumed a run that had already finished: report it as it stands
        evaluation = evaluate(
            evaluated, dataset.test_images, dataset.test_labels, mean=spec.mean, std=spec.std, device=device,
            tta=config.tta,
        )  # fmt: skip
    metrics = _metrics(config, dataset, evaluated, evaluation, len(history), train_seconds, pretrained, device, amp)
    write_json_atomic(run_dir / "metrics.json", metrics)
    final = raw_module(evaluated).to("cpu").eval()
    return RunResult(
        run_dir,
        config,
        spec,
        final,
        history,
        metrics,
        evaluation,
        dataset.test_images,
        dataset.test_labels,
    )


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


def _last_lr(config: TrainConfig, scheduler: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int) -> float:
    """The base learning rate (lr_scale 1) of the last step taken."""
    total = config.epochs * steps_per_epoch
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return config.lr * optim.lr_factor(config.schedule, scheduler.last_epoch - 1, total, warmup)


def _metrics(
    config: TrainConfig,
    dataset: ImageDataset,
    model: nn.Module,
    evaluation: Evaluation,
    epochs: int,
    train_seconds: float,
    pretrained: str | None,
    device: torch.device,
    amp: bool,
) -> dict[str, Any]:
    return {
        "model": config.model,
        "data": config.data,
        "epochs": epochs,
        "test_accuracy": evaluation.accuracy,
        "test_loss": evaluation.loss,
        "train_seconds": train_seconds,
        "parameters": sum(p.numel() for p in raw_module(model).parameters()),
        "class_names": list(dataset.class_names),
        "pretrained": pretrained,
        "train_images": len(dataset.train_labels),
        "test_images": len(dataset.test_labels),
        "device": str(device),
        "precision": "bfloat16 autocast" if amp else "float32",  # of the training steps; evaluation is float32
        "ema": config.ema,
        "tta": config.tta,
    }


def _training_state(
    model: nn.Module,
    ema: AveragedModel | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
    train_seconds: float,
) -> dict[str, Any]:
    """What a resumed run needs beyond the evaluated weights; tensors and plain containers only."""
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data_generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "train_seconds": train_seconds,
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    if ema is not None:  # the checkpoint's model_state is the EMA; keep the live weights and the EMA count too
        state["live_model_state"] = {k: v.detach().cpu() for k, v in raw_module(model).state_dict().items()}
        state["ema_updates"] = ema.n_averaged.detach().cpu()
    return state


def _restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    ema: AveragedModel | None,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    device: torch.device,
) -> None:
    state = checkpoint.training_state
    if ema is not None:
        model.load_state_dict(state["live_model_state"])
        ema.module.load_state_dict(checkpoint.model_state)
        ema.n_averaged.copy_(state["ema_updates"])
    else:
        model.load_state_dict(checkpoint.model_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["data_generator"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


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
