"""Tests for training.reports: run plots, confusion matrix, filter normalisation and run comparison."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from inference.spec import ModelSpec
from training.models import build_model
from training.reports import (
    _write_atomically,
    compare_runs,
    confusion_matrix,
    data_label,
    normalise_filters,
    write_run_report,
)

CLASSES = ("cat", "dog", "frog")
RUN_PLOTS = {"loss.png", "accuracy.png", "confusion_matrix.png", "filters.png", "predictions.png"}


def _history(epochs: int, *, skip_test: set[int] = frozenset()) -> list[dict]:
    """Engine-style history rows; epochs in skip_test have no test metrics (None, or the keys missing)."""
    rows = []
    for epoch in range(1, epochs + 1):
        row = {
            "epoch": epoch,
            "lr": 0.1 / epoch,
            "train_loss": 2.0 / epoch,
            "train_accuracy": 1.0 - 0.6 / epoch,
            "test_loss": 2.2 / epoch,
            "test_accuracy": 0.9 - 0.6 / epoch,
            "epoch_seconds": 3.5,
            "train_images_per_second": 1000.0,
        }
        if epoch in skip_test:
            if epoch % 2:
                row["test_loss"] = row["test_accuracy"] = None
            else:
                del row["test_loss"], row["test_accuracy"]
        rows.append(row)
    return rows


def _test_set(count: int, num_classes: int = len(CLASSES), size=(8, 8)):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(count, *size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count).astype(np.int64)
    probabilities = rng.dirichlet(np.ones(num_classes), size=count).astype(np.float32)
    return images, labels, probabilities


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 0 and image.height > 0
        image.load()  # decodes every pixel: a truncated file fails here


def test_confusion_matrix_counts_a_known_example():
    labels = np.array([0, 0, 1, 2, 2, 2])
    predictions = np.array([0, 1, 1, 2, 0, 2])
    expected = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 3), expected)
    # A class that never occurs still gets its row and column.
    np.testing.assert_array_equal(confusion_matrix(labels, predictions, 4)[:3, :3], expected)
    assert confusion_matrix(labels, predictions, 4)[3].sum() == 0


@pytest.mark.parametrize(
    "labels, predictions",
    [([0, 1], [0]), ([0, 3], [0, 1]), ([0, 1], [-1, 1])],
    ids=["length-mismatch", "label-out-of-range", "negative-prediction"],
)
def test_confusion_matrix_rejects_bad_input(labels, predictions):
    with pytest.raises(ValueError):
        confusion_matrix(np.array(labels), np.array(predictions), 3)


def test_normalise_filters_maps_each_filter_to_unit_range_and_constant_to_gray():
    weights = np.zeros((3, 3, 2, 2), dtype=np.float32)
    weights[0] = np.arange(12).reshape(3, 2, 2)  # RGB filter with values 0..11
    weights[1] = 7.5  # constant: the lesson's (w - min) / (max - min) gives NaN here
    weights[2, 1, 0, 0] = -4.0  # one negative pixel in the green channel
    tiles = normalise_filters(weights)
    assert tiles.shape == (3, 2, 2, 3)
    assert not np.isnan(tiles).any()
    np.testing.assert_allclose(tiles[0].min(), 0.0)
    np.testing.assert_allclose(tiles[0].max(), 1.0)
    # (out, in, kH, kW) -> (out, kH, kW, RGB): the red channel of pixel (0, 1) is weight[0, 0, 0, 1] = 1.
    np.testing.assert_allclose(tiles[0, 0, 1, 0], 1 / 11)
    np.testing.assert_allclose(tiles[1], 0.5)
    np.testing.assert_allclose(tiles[2, 0, 0], [1.0, 0.0, 1.0])


def test_normalise_filters_shows_non_rgb_input_as_gray_first_channel():
    weights = np.random.default_rng(0).normal(size=(5, 4, 3, 3))
    tiles = normalise_filters(weights)
    assert tiles.shape == (5, 3, 3, 3)
    np.testing.assert_array_equal(tiles[..., 0], tiles[..., 1])
    np.testing.assert_array_equal(tiles[..., 0], tiles[..., 2])
    first = weights[0, 0]
    np.testing.assert_allclose(tiles[0, ..., 0], (first - first.min()) / (first.max() - first.min()))


def test_write_run_report_writes_every_plot_as_a_valid_png(tmp_path):
    spec = ModelSpec("cnn_plain", CLASSES, input_size=(8, 8))
    model = build_model("cnn_plain", len(CLASSES), (8, 8))
    images, labels, probabilities = _test_set(40)
    written = write_run_report(
        tmp_path,
        history=_history(4, skip_test={1, 2}),
        model=model,
        spec=spec,
        test_images=images,
        test_labels=labels,
        probabilities=probabilities,
    )
    assert {path.name for path in written} == RUN_PLOTS
    assert all(path.parent == tmp_path / "plots" for path in written)
    for path in written:
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(RUN_PLOTS)  # no temp files left


@pytest.mark.parametrize(
    "in_channels, filters",
    [(3, 1), (1, 7), (5, 64)],
    ids=["rgb-one", "gray-seven", "five-channel-64"],
)
def test_write_run_report_handles_any_first_conv_and_few_test_images(tmp_path, in_channels, filters):
    model = nn.Sequential(nn.Conv2d(in_channels, filters, 5), nn.Flatten())
    with torch.no_grad():
        model[0].weight[0].fill_(0.25)  # a constant filter must not produce NaN or a warning
    spec = ModelSpec("custom", ("a", "b"), input_size=(12, 10))
    images, labels, probabilities = _test_set(5, num_classes=2, size=(12, 10))
    written = write_run_report(
        tmp_path,
        history=_history(1),
        model=model,
        spec=spec,
        test_images=images,
        test_labels=labels,
        probabilities=probabilities,
    )
    assert {path.name for path in written} == RUN_PLOTS
    _assert_png(tmp_path / "plots" / "filters.png")
    _assert_png(tmp_path / "plots" / "predictions.png")


def test_write_run_report_skips_filters_for_a_model_without_conv(tmp_path):
    spec = ModelSpec("mlp", CLASSES, input_size=(8, 8))
    images, labels, probabilities = _test_set(6)
    written = write_run_report(
        tmp_path,
        history=_history(2),
        model=nn.Sequential(nn.Flatten(), nn.Linear(192, 3)),
        spec=spec,
        test_images=images,
        test_labels=labels,
        probabilities=probabilities,
    )
    assert {path.name for path in written} == RUN_PLOTS - {"filters.png"}


@pytest.mark.parametrize("problem", ["empty-history", "wrong-class-count", "label-count", "gray-images"])
def test_write_run_report_rejects_inconsistent_input(tmp_path, problem):
    images, labels, probabilities = _test_set(6)
    history = _history(2)
    if problem == "empty-history":
        history = []
    elif problem == "wrong-class-count":
        probabilities = probabilities[:, :2]
    elif problem == "label-count":
        labels = labels[:5]
    else:
        images = images[..., 0]
    with pytest.raises(ValueError):
        write_run_report(
            tmp_path,
            history=history,
            model=nn.Conv2d(3, 2, 3),
            spec=ModelSpec("x", CLASSES, input_size=(8, 8)),
            test_images=images,
            test_labels=labels,
            probabilities=probabilities,
        )
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


@pytest.mark.parametrize(
    "source, num_classes, expected",
    [
        ("/work/shared/data/cifar10-jpeg.tar.gz", None, "CIFAR-10 (JPEG q75)"),
        ("data/cifar10-jpeg/", 10, "CIFAR-10 (JPEG q75)"),
        ("cifar10-jpeg.tgz", 5, "CIFAR-10 (JPEG q75), 5 of 10 classes"),
        ("cifar10", 10, "CIFAR-10 (official)"),
        (
            "some/folder/cifar10",
            None,
            "some/folder/cifar10",
        ),  # a local folder, not the official download
        ("/data/flowers.tar", 5, "/data/flowers.tar"),
    ],
)
def test_data_label_names_the_jpeg_copy_precisely(source, num_classes, expected):
    assert data_label(source, num_classes) == expected


def _write_run(
    root: Path,
    name: str,
    *,
    model: str,
    epochs: int,
    accuracy: float,
    seconds: float,
    pretrained=None,
) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metrics = {
        "model": model,
        "data": "/work/shared/data/cifar10-jpeg.tar.gz",
        "epochs": epochs,
        "test_accuracy": accuracy,
        "test_loss": 0.9,
        "train_seconds": seconds,
        "parameters": 62006 if model == "cnn_plain" else 11173962,
        "class_names": list(CLASSES) * 3 + ["truck"],  # 10 classes
        "pretrained": pretrained,
    }
    config = {"model": model, "epochs": epochs, "lr": 0.05, "out": str(run_dir), "batch_size": 128}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "history.json").write_text(json.dumps(_history(epochs, skip_test={2})))
    return run_dir


def test_compare_runs_tables_each_runs_numbers_in_the_given_order(tmp_path):
    plain = _write_run(tmp_path, "plain", model="cnn_plain", epochs=3, accuracy=0.61234, seconds=42.0)
    transfer = _write_run(
        tmp_path,
        "transfer",
        model="resnet18_transfer",
        epochs=6,
        accuracy=0.8765,
        seconds=3723.0,
        pretrained="imagenet (torchvision IMAGENET1K_V1)",
    )
    markdown = compare_runs([transfer, plain], tmp_path / "out")
    assert markdown == tmp_path / "out" / "comparison.md"
    _assert_png(tmp_path / "out" / "comparison.png")
    lines = markdown.read_text().splitlines()
    # The markdown's two tables (consecutive `|` lines): the runs' numbers, then the settings that differ.
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    table, differences = ("\n".join(itertools.takewhile(lambda line: line.startswith("|"), lines[i:])) for i in starts)
    rows = [line for line in table.splitlines() if line.startswith(("| transfer", "| plain"))]
    assert [row.split("|")[1].strip() for row in rows] == ["transfer", "plain"]
    transfer_row, plain_row = rows
    for cell in [
        "resnet18_transfer",
        "6",
        "1 h 02 min",
        "11,173,962",
        "87.65",
        "CIFAR-10 (JPEG q75)",
    ]:
        assert f"| {cell} |" in transfer_row
    assert "imagenet (torchvision IMAGENET1K_V1)" in transfer_row
    for cell in [
        "cnn_plain",
        "3",
        "42.0 s",
        "62,006",
        "61.23",
        "CIFAR-10 (JPEG q75)",
        "none (from scratch)",
    ]:
        assert f"| {cell} |" in plain_row
    # Config values that differ are listed; the output folder is not a setting.
    assert "| run | epochs | model |" in differences
    assert "batch_size" not in differences and "| out" not in differences


def test_compare_runs_errors_name_the_folder_and_the_problem(tmp_path):
    good = _write_run(tmp_path, "good", model="cnn_plain", epochs=2, accuracy=0.5, seconds=10.0)
    broken = _write_run(tmp_path, "broken", model="cnn_plain", epochs=2, accuracy=0.5, seconds=10.0)
    cases = {
        "missing history.json": lambda: (broken / "history.json").unlink(),
        "config.json is not valid JSON": lambda: (broken / "config.json").write_text("{not json"),
        "metrics.json lacks test_accuracy": lambda: (broken / "metrics.json").write_text(
            json.dumps({"model": "m", "data": "d", "epochs": 1, "train_seconds": 1, "parameters": 1})
        ),
        "history.json must hold a JSON array": lambda: (broken / "history.json").write_text("{}"),
        "test_accuracy must be a number in [0, 1]": lambda: (broken / "metrics.json").write_text(
            json.dumps(
                {
                    "model": "m",
                    "data": "d",
                    "epochs": 1,
                    "test_accuracy": 87.6,
                    "train_seconds": 1,
                    "parameters": 1,
                }
            )
        ),
    }
    for problem, break_it in cases.items():
        break_it()
        with pytest.raises(ValueError) as error:
            compare_runs([good, broken], tmp_path / "out")
        message = str(error.value)
        assert str(broken) in message and problem in message and "\n" not in message
        broken.rename(tmp_path / f"broken-{len(problem)}")
        broken = _write_run(tmp_path, "broken", model="cnn_plain", epochs=2, accuracy=0.5, seconds=10.0)
    with pytest.raises(ValueError, match="not a folder"):
        compare_runs([good, tmp_path / "absent"], tmp_path / "out")
    with pytest.raises(ValueError, match="no runs"):
        compare_runs([], tmp_path / "out")
    assert not (tmp_path / "out" / "comparison.md").exists()


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"previous")

    def fail_halfway(f):
        f.write(b"half a png")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        _write_atomically(target, fail_halfway)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
