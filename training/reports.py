"""Training reports: per-run plots (curves, confusion matrix, filters, predictions) and run comparisons."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from inference.files import atomic_write
from inference.spec import ModelSpec

PLOTS_DIR = "plots"  # inside a run folder
PREDICTION_SAMPLES = 32  # test images shown in predictions.png
PREDICTION_COLUMNS = 8
DPI = 120
# Above this many classes the per-cell counts of the confusion matrix would be unreadable.
MAX_ANNOTATED_CLASSES = 20


@dataclass(frozen=True)
class DataSource:
    label: str  # what a reader should see next to an accuracy number
    num_classes: int  # the full dataset's; fewer in a run means a class subset


# Sources whose accuracy needs a precise name: the JPEG copy is not the official CIFAR-10 pixels.
_NAMED_SOURCES = {"cifar10": DataSource("CIFAR-10 (official)", 10)}  # source strings (not paths)
_KNOWN_FILES = {"cifar10-jpeg": DataSource("CIFAR-10 (JPEG q75)", 10)}  # archive or folder name, no suffix
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# Config keys about where a run was written and how it reported, not how it trained: not compared.
_NOT_SETTINGS = frozenset({"out", "resume", "progress", "cache_dir"})


# ---------------------------------------------------------------------------------------------
# Per-run report


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def normalise_filters(weights: np.ndarray) -> np.ndarray:
    """Conv weights (out, in, kH, kW) -> (out, kH, kW, 3) float in [0, 1], one min-max scale per filter.

    3 input channels are shown as RGB, any other count as the first channel in gray. A constant
    filter (max == min; the lesson's snippet divides by zero there) becomes mid-gray, not NaN.
    """
    if weights.ndim != 4:
        raise ValueError(f"conv weights must be (out, in, kH, kW), got shape {weights.shape}")
    weights = weights.astype(np.float64)
    if weights.shape[1] == 3:
        images = weights.transpose(0, 2, 3, 1)
    else:
        images = np.repeat(weights[:, 0, :, :, None], 3, axis=-1)
    low = images.min(axis=(1, 2, 3), keepdims=True)
    span = images.max(axis=(1, 2, 3), keepdims=True) - low
    flat = span <= 1e-12 * np.maximum(1.0, np.abs(low))
    scaled = (images - low) / np.where(flat, 1.0, span)
    return np.where(flat, 0.5, scaled)


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first Conv2d in module registration order (the network's input layer for these models)."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def write_run_report(
    run_dir: Path,
    *,
    history: list[dict[str, Any]],
    model: nn.Module,
    spec: ModelSpec,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    probabilities: np.ndarray,
) -> list[Path]:
    """Write run_dir/plots/*.png and return their paths.

    test_images: (N, H, W, 3) uint8; test_labels: (N,) int; probabilities: (N, C) float, C = spec.num_classes.
    History rows are the engine's per-epoch metrics; test_* may be None or missing for epochs not evaluated.
    filters.png is skipped for a model without a Conv2d layer.
    """
    if not history:
        raise ValueError("the run report needs at least one epoch of history")
    test_images, test_labels = np.asarray(test_images), np.asarray(test_labels)
    probabilities = np.asarray(probabilities)
    count = len(test_images)
    if test_images.ndim != 4 or test_images.shape[-1] != 3:
        raise ValueError(f"test images must be (N, H, W, 3), got shape {test_images.shape}")
    if test_labels.shape != (count,):
        raise ValueError(f"{count} test images need labels of shape ({count},), got {test_labels.shape}")
    if probabilities.shape != (count, spec.num_classes):
        raise ValueError(
            f"{count} test images and {spec.num_classes} classes need probabilities of shape"
            f" ({count}, {spec.num_classes}), got {probabilities.shape}"
        )
    plots = Path(run_dir) / PLOTS_DIR
    plots.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)

    figures = {
        "loss.png": _curves_figure(history, "loss", "loss", f"{spec.arch}: loss per epoch", 1.0),
        "accuracy.png": _curves_figure(history, "accuracy", "accuracy (%)", f"{spec.arch}: accuracy per epoch", 100.0),
        "confusion_matrix.png": _confusion_figure(
            confusion_matrix(test_labels, predictions, spec.num_classes), spec.class_names
        ),
        "predictions.png": _predictions_figure(test_images, test_labels, probabilities, spec.class_names),
    }
    conv = first_conv(model)
    if conv is not None:
        figures["filters.png"] = _filters_figure(conv)
    return [_save_png(figure, plots / name) for name, figure in figures.items()]


def _series(history: list[dict[str, Any]], key: str, scale: float) -> tuple[list[int], list[float]]:
    """(epochs, values) for the rows where `key` has a value; a gap leaves the line joined across it."""
    rows = [row for row in history if row.get(key) is not None]
    return [int(row["epoch"]) for row in rows], [float(row[key]) * scale for row in rows]


def _curves_figure(history: list[dict[str, Any]], metric: str, ylabel: str, title: str, scale: float) -> Figure:
    figure, axes = _new_figure((6.4, 4.2))
    for split, style in (("train", "o-"), ("test", "s--")):
        epochs, values = _series(history, f"{split}_{metric}", scale)
        if epochs:
            axes.plot(epochs, values, style, label=split, markersize=4)
    axes.set(xlabel="epoch", ylabel=ylabel, title=title)
    _integer_epochs(axes)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    return figure


def _confusion_figure(counts: np.ndarray, class_names: tuple[str, ...]) -> Figure:
    n = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    # Colour = the fraction of each true class predicted as each class, so rare classes stay visible.
    fractions = counts / np.maximum(totals, 1)
    side = max(5.0, 0.55 * n + 2.5)
    figure, axes = _new_figure((side + 1.0, side))
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xticks(range(n), class_names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(range(n), class_names)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set(
        xlabel="predicted class",
        ylabel="true class",
        title=f"Confusion matrix: {counts.sum()} test images, accuracy {100 * accuracy:.2f}%",
    )
    if n <= MAX_ANNOTATED_CLASSES:
        for row in range(n):
            for col in range(n):
                colour = "white" if fractions[row, col] > 0.5 else "black"
                axes.text(
                    col,
                    row,
                    str(counts[row, col]),
                    ha="center",
                    va="center",
                    color=colour,
                    fontsize=8,
                )
    return figure


def _filters_figure(conv: nn.Conv2d) -> Figure:
    tiles = normalise_filters(conv.weight.detach().cpu().numpy())  # (out, kH, kW, 3)
    count, height, width, _ = tiles.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    # One mosaic with 1-pixel white gutters, drawn with nearest-neighbour upscaling.
    mosaic = np.ones((rows * (height + 1) + 1, columns * (width + 1) + 1, 3))
    for index, tile in enumerate(tiles):
        top = 1 + (index // columns) * (height + 1)
        left = 1 + (index % columns) * (width + 1)
        mosaic[top : top + height, left : left + width] = tile
    if conv.in_channels == 3:
        colour = "RGB"
    elif conv.in_channels == 1:
        colour = "gray"
    else:
        colour = f"input channel 0 of {conv.in_channels}, gray"
    side = min(8.0, max(4.0, 0.6 * columns + 1.0))
    figure, axes = _new_figure((side, side * mosaic.shape[0] / mosaic.shape[1] + 0.6))
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_axis_off()
    axes.set_title(f"First conv layer: {count} filters, {height}x{width}\n{colour}", fontsize=10)
    return figure


def _predictions_figure(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...]
) -> Figure:
    # A fixed random sample: image-folder test sets are sorted by class, so the first N would be one class.
    count = min(PREDICTION_SAMPLES, len(images))
    chosen = np.sort(np.random.default_rng(0).choice(len(images), size=count, replace=False))
    columns = min(PREDICTION_COLUMNS, max(count, 1))
    rows = max(1, math.ceil(count / columns))
    # A fixed grid layout: constrained layout takes seconds to solve for 32 titled axes.
    height = 2.0 * rows + 0.5
    figure = Figure(figsize=(1.7 * columns, height), dpi=DPI)
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.8 / height, wspace=0.1, hspace=0.5)
    wrong = 0
    for slot, index in enumerate(chosen):
        axes = figure.add_subplot(rows, columns, slot + 1)
        predicted, true = int(probabilities[index].argmax()), int(labels[index])
        wrong += predicted != true
        axes.imshow(images[index], interpolation="nearest")
        axes.set_axis_off()
        axes.set_title(
            f"{_short(class_names[predicted])} {100 * probabilities[index, predicted]:.0f}%\n"
            f"true: {_short(class_names[true])}",
            fontsize=8,
            color="tab:red" if predicted != true else "black",
        )
    figure.suptitle(f"Predictions on {count} random test images ({wrong} wrong, in red)", fontsize=10)
    return figure


def _short(name: str, limit: int = 16) -> str:
    """Class names cut to fit a thumbnail's width."""
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _integer_epochs(axes) -> None:
    # min_n_ticks=1: with a single epoch the default falls back to fractional ticks (0.96, 0.98, ...).
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _new_figure(size: tuple[float, float]):
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # attaches the Agg canvas: no display, no pyplot global state
    return figure, figure.add_subplot()


def _save_png(figure: Figure, path: Path) -> Path:
    _write_atomically(path, lambda f: figure.savefig(f, format="png"))
    return path


def _write_atomically(path: Path, write) -> None:
    with atomic_write(path) as f:
        write(f)


# ---------------------------------------------------------------------------------------------
# Run comparison


@dataclass(frozen=True)
class RunRecord:
    """What a finished run folder says about itself: metrics.json, config.json, history.json."""

    run_dir: Path
    metrics: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]]


_REQUIRED_METRICS = ("model", "data", "epochs", "test_accuracy", "train_seconds", "parameters")


def load_run(run_dir: Path) -> RunRecord:
    """Read and check a run folder; ValueError with a one-line message naming the folder and the problem."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run {run_dir}: not a folder")
    metrics = _read_json(run_dir, "metrics.json", dict)
    config = _read_json(run_dir, "config.json", dict)
    history = _read_json(run_dir, "history.json", list)
    missing = [key for key in _REQUIRED_METRICS if key not in metrics]
    if missing:
        raise ValueError(f"run {run_dir}: metrics.json lacks {', '.join(missing)}")
    accuracy = metrics["test_accuracy"]
    if not isinstance(accuracy, (int, float)) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"run {run_dir}: metrics.json test_accuracy must be a number in [0, 1], got {accuracy!r}")
    for key in ("epochs", "train_seconds", "parameters"):
        if not isinstance(metrics[key], (int, float)):
            raise ValueError(f"run {run_dir}: metrics.json {key} must be a number, got {metrics[key]!r}")
    for position, row in enumerate(history):
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ValueError(f"run {run_dir}: history.json row {position} has no integer epoch")
    return RunRecord(run_dir, metrics, config, history)


def _read_json(run_dir: Path, name: str, kind: type) -> Any:
    path = run_dir / name
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"run {run_dir}: missing {name}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"run {run_dir}: cannot read {name}: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"run {run_dir}: {name} is not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise ValueError(f"run {run_dir}: {name} must hold a JSON {'object' if kind is dict else 'array'}")
    return value


def data_label(source: str, num_classes: int | None = None) -> str:
    """How to name a run's data next to its accuracy, e.g. "CIFAR-10 (JPEG q75)" for the JPEG copy."""
    known = _NAMED_SOURCES.get(source)
    if known is None:
        name = Path(source).name
        for suffix in _ARCHIVE_SUFFIXES:
            name = name.removesuffix(suffix)
        known = _KNOWN_FILES.get(name)
    if known is None:
        return source
    if num_classes is not None and num_classes != known.num_classes:
        return f"{known.label}, {num_classes} of {known.num_classes} classes"
    return known.label


def compare_runs(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write out_dir/comparison.md (a table, runs in the given order) and comparison.png; return the .md path."""
    if not run_dirs:
        raise ValueError("no runs to compare")
    runs = [load_run(Path(run_dir)) for run_dir in run_dirs]
    names = _run_names([run.run_dir for run in runs])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_png(_comparison_figure(runs, names), out_dir / "comparison.png")
    markdown = out_dir / "comparison.md"
    text = _comparison_markdown(runs, names)
    _write_atomically(markdown, lambda f: f.write(text.encode("utf-8")))
    return markdown


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names, or the paths as given where two runs share a folder name."""
    names = [run_dir.name for run_dir in run_dirs]
    return [str(d) if names.count(d.name) > 1 else d.name for d in run_dirs]


def _comparison_markdown(runs: list[RunRecord], names: list[str]) -> str:
    header = [
        "run",
        "model",
        "epochs",
        "wall time",
        "parameters",
        "test accuracy (%)",
        "data",
        "pretrained",
    ]
    rows = []
    for run, name in zip(runs, names, strict=True):
        m = run.metrics
        class_count = len(m["class_names"]) if isinstance(m.get("class_names"), list) else None
        rows.append(
            [
                name,
                str(m["model"]),
                str(m["epochs"]),
                _duration(float(m["train_seconds"])),
                f"{int(m['parameters']):,}",
                f"{100 * m['test_accuracy']:.2f}",
                data_label(str(m["data"]), class_count),
                str(m.get("pretrained") or "none (from scratch)"),
            ]
        )
    lines = [
        "# Run comparison",
        "",
        "Test accuracy is top-1 on the test split of the data named beside it; wall time is training time"
        " (`train_seconds`).",
        "",
        *_markdown_table(header, rows),
    ]
    differences = _setting_differences(runs)
    if differences:
        lines += ["", "## Settings that differ between runs", ""]
        lines += _markdown_table(
            ["run", *differences],
            [
                [name, *(_setting(run.config, key) for key in differences)]
                for run, name in zip(runs, names, strict=True)
            ],
        )
    lines += ["", "![test accuracy and train loss per epoch](comparison.png)", ""]
    return "\n".join(lines)


def _setting_differences(runs: list[RunRecord]) -> list[str]:
    keys = sorted({key for run in runs for key in run.config} - _NOT_SETTINGS)
    return [key for key in keys if len({_setting(run.config, key) for run in runs}) > 1]


def _setting(config: dict[str, Any], key: str) -> str:
    if key not in config:
        return "-"
    value = config[key]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _comparison_figure(runs: list[RunRecord], names: list[str]) -> Figure:
    figure = Figure(figsize=(12.0, 4.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for run, name in zip(runs, names, strict=True):
        epochs, accuracy = _series(run.history, "test_accuracy", 100.0)
        (line,) = accuracy_axes.plot(epochs, accuracy, "o-", markersize=3, label=name)
        epochs, loss = _series(run.history, "train_loss", 1.0)
        loss_axes.plot(epochs, loss, "o-", markersize=3, color=line.get_color(), label=name)
    sources = sorted({data_label(str(run.metrics["data"])) for run in runs})
    accuracy_axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"Test accuracy on {', '.join(sources)}")
    loss_axes.set(xlabel="epoch", ylabel="train loss", title="Train loss")
    for axes in (accuracy_axes, loss_axes):
        _integer_epochs(axes)
        axes.grid(alpha=0.3)
    # One legend for both panels, below them, so long run names never cover the curves.
    figure.legend(
        *accuracy_axes.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=min(len(runs), 4),
    )
    return figure
