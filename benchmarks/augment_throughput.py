"""Benchmark: batched augmentation throughput against the training step's consumption (images/s, CPU).

    python benchmarks/augment_throughput.py [--repeats 5] [--out benchmarks/results/augment_throughput.md]

Augmentation must outpace a training step of the smallest model (cnn_bn), or it becomes the bottleneck.
Each number is the median of --repeats timed repeats, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.files import atomic_write  # noqa: E402
from inference.spec import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from training.augment import Augmenter, iterate_batches, to_model_input  # noqa: E402
from training.models import build_model  # noqa: E402

IMAGE_SIZE = (32, 32)


def images_per_second(
    step: Callable[[], None],
    images_per_step: int,
    steps: int,
    repeats: int,
    warm_up: Callable[[], None] | None = None,
) -> float:
    """Median over `repeats` of images/s, each repeat timing `steps` calls, after one warm-up call."""
    (warm_up or step)()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(images_per_step * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def augmentation_rate(batch_size: int, repeats: int, threads: int) -> float:
    images = torch.randint(0, 256, (batch_size, *IMAGE_SIZE, 3), dtype=torch.uint8)
    augment = Augmenter(IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return images_per_second(lambda: augment(images, generator), batch_size, steps=10, repeats=repeats)
    finally:
        torch.set_num_threads(previous)


def normalise_only_rate(batch_size: int, repeats: int) -> float:
    images = torch.randint(0, 256, (batch_size, *IMAGE_SIZE, 3), dtype=torch.uint8)
    return images_per_second(
        lambda: to_model_input(images, IMAGENET_MEAN, IMAGENET_STD),
        batch_size,
        steps=10,
        repeats=repeats,
    )


def iterator_rate(batch_size: int, repeats: int) -> float:
    """iterate_batches with augmentation over a 10-batch dataset: gather + augment + prefetch thread."""
    n = batch_size * 10
    images = np.random.default_rng(0).integers(0, 256, (n, *IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    augment = Augmenter(IMAGENET_MEAN, IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> None:
        for _ in iterate_batches(
            images, labels, batch_size, shuffle=True, generator=generator, augmenter=augment,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ):  # fmt: skip
            pass

    return images_per_second(epoch, n, steps=1, repeats=repeats)


def training_step_rate(arch: str, batch_size: int, steps: int, repeats: int) -> float:
    """Forward + backward + SGD step on random channels_last data."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch_size, 3, *IMAGE_SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step(inputs: torch.Tensor = x, targets: torch.Tensor = y) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    # Warm up on a small batch: resnet18's full step takes tens of seconds on a busy 2-core machine.
    return images_per_second(step, batch_size, steps=steps, repeats=repeats, warm_up=lambda: step(x[:16], y[:16]))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (the median is kept)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/augment_throughput.md"),
        help="markdown result file",
    )
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    started = time.perf_counter()

    load_before = os.getloadavg()[0]
    rows = []
    for batch_size in (256, 512):
        rows.append((f"Augmenter (flip, rotate, translate, crop, jitter), batch {batch_size}",
                     augmentation_rate(batch_size, args.repeats, threads)))  # fmt: skip
    rows.append(("Augmenter, batch 256, torch.set_num_threads(1)", augmentation_rate(256, args.repeats, 1)))
    rows.append(("to_model_input only (no augmentation), batch 256", normalise_only_rate(256, args.repeats)))
    iterator = iterator_rate(256, args.repeats)
    rows.append(
        (
            "iterate_batches with Augmenter (gather + augment in the prefetch thread), batch 256",
            iterator,
        )
    )
    resnet_repeats = max(2, args.repeats // 2)
    cnn_bn = training_step_rate("cnn_bn", 256, steps=3, repeats=args.repeats)
    resnet18 = training_step_rate("resnet18", 256, steps=1, repeats=resnet_repeats)
    rows.append(("training step cnn_bn (fwd+bwd+SGD, channels_last), batch 256", cnn_bn))
    rows.append(("training step resnet18 (fwd+bwd+SGD, channels_last), batch 256", resnet18))
    elapsed = time.perf_counter() - started

    augment_256 = rows[0][1]
    lines = [
        "# Augmentation throughput vs training-step consumption (CPU)",
        "",
        f"- Command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- Machine: {os.cpu_count()} cores (nproc), {cpu_model()}, no GPU used; torch {torch.__version__}; "
        f"torch.set_num_threads({threads}) unless a row says otherwise",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Images 32x32, random data; medians of {args.repeats} repeats (resnet18: {resnet_repeats}); "
        f"whole run {elapsed:.0f} s; 1-minute load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (the machine is shared: compare within this table only).",
        "",
        "| measurement | images/s |",
        "|---|---:|",
        *[f"| {name} | {rate:,.0f} |" for name, rate in rows],
        "",
        f"Augmentation alone (batch 256) runs at {augment_256 / cnn_bn:.1f}x the rate a cnn_bn training step "
        f"consumes and {augment_256 / resnet18:.0f}x resnet18's; through iterate_batches, as training uses it, "
        f"{iterator / cnn_bn:.1f}x cnn_bn's. It runs in iterate_batches' background thread, overlapping "
        "with the step (both share the same cores), so it is not the bottleneck.",
        "",
    ]
    with atomic_write(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
