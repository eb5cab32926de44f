"""Tests for `python -m training`: train/evaluate/models/compare, and one-line errors without tracebacks."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.training_data import REPO, tiny_dataset, write_image_tree
from training.checkpoint import load_checkpoint
from training.cli import _input_size, main
from training.models import list_models


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("cli") / "data", tiny_dataset())


def _train_args(tree: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "cnn_bn", "--data", str(tree), "--out", str(out), "--epochs", "1",
            "--batch-size", "16", "--cache-dir", str(out.parent / "cache"), "--no-progress", "--no-report",
            *extra]  # fmt: skip


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_train_then_evaluate_then_compare(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tree, run, "--classes", "cat,dog", "--report")) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "plots:" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["class_names"] == ["cat", "dog"] and 0 <= metrics["test_accuracy"] <= 1
    assert (run / "plots" / "loss.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["cat", "dog"] and config["batch_size"] == 16 and config["lr"] == 0.05

    before = _files(tmp_path)
    assert (
        main(
            [
                "evaluate",
                "--run",
                str(run),
                "--data",
                str(tree),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"accuracy {metrics['test_accuracy']:.4f}" in printed and "on 8 test images" in printed
    assert _files(tmp_path) == before  # evaluate writes nothing unless asked

    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "comparison.md").is_file()


def test_resume_continues_with_only_the_flags_given(tree, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_args(tree, run, "--lr", "0.02")) == 0
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--resume",
                "--epochs",
                "2",
                "--no-report",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert json.loads((run / "config.json").read_text())["lr"] == 0.02
    capsys.readouterr()
    code = main(["train", "--out", str(run), "--resume", "--epochs", "3", "--lr", "0.1"])
    assert "lr=0.02 (run) vs 0.1 (now)" in _one_line_error(capsys, code)


def test_input_size_few_labels_and_arch_flags_reach_the_run(tree, tmp_path):
    run = tmp_path / "run"
    args = _train_args(tree, run, "--input-size", "16", "--train-per-class", "4")
    args[args.index("cnn_bn")] = "airbench"
    assert main([*args, "--arch", "widths=[8,16,16]", "--tta", "--ema"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_images"] == 12 and metrics["test_images"] == 12  # 3 classes
    checkpoint = load_checkpoint(run)
    assert checkpoint.spec.input_size == (16, 16)
    assert checkpoint.spec.arch_kwargs == {"widths": [8, 16, 16]}
    assert checkpoint.build_model().head.in_features == 16


def test_input_size_parsing():
    assert _input_size("64") == (64, 64) and _input_size("48x64") == (48, 64)
    for bad in ("0", "x", "12x", "1x2x3"):
        with pytest.raises(argparse.ArgumentTypeError):
            _input_size(bad)


def test_models_lists_the_registry_with_parameter_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for info in list_models():
        assert info.name in out and info.description in out
    assert "60,458" in out  # cnn_bn with a 10-class head


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope"], "unknown model 'nope'; valid models: airbench, cnn_bn"),
        (["--data", "MISSING"], "does not exist"),
        (["--optimizer", "sgd", "--lr", "-1"], "learning rate must be > 0"),
        (["--mode", "frozen"], "--mode frozen needs --pretrained"),
    ],
)
def test_bad_training_input_is_one_line(tree, tmp_path, capsys, args, message):
    base = {"--model": "cnn_bn", "--data": str(tree), "--out": str(tmp_path / "run")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value.replace("MISSING", str(tmp_path / "missing"))
    code = main(["train", *[x for pair in base.items() for x in pair], "--no-progress"])
    assert message in _one_line_error(capsys, code)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_bad_epochs_is_one_line(tree, tmp_path, capsys, epochs):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--model",
                "cnn_bn",
                "--data",
                str(tree),
                "--out",
                str(tmp_path / "r"),
                "--epochs",
                epochs,
            ]
        )
    assert "argument --epochs: expected a positive integer" in _one_line_error(capsys, exit_info.value.code)


def test_resume_of_a_missing_run_is_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "never"), "--resume"])
    assert "cannot resume: no checkpoint at" in _one_line_error(capsys, code)


def test_train_without_model_data_or_out_is_one_line(capsys):
    assert "train needs --model, --data, --out" in _one_line_error(capsys, main(["train"]))


def test_evaluate_and_compare_of_missing_runs_are_one_line(tmp_path, capsys):
    code = main(["evaluate", "--run", str(tmp_path / "none"), "--data", str(tmp_path)])
    assert "no checkpoint at" in _one_line_error(capsys, code)
    code = main(["compare", str(tmp_path / "none"), "--out", str(tmp_path / "cmp")])
    assert "not a folder" in _one_line_error(capsys, code)


@pytest.mark.slow
@pytest.mark.e2e
def test_the_module_entry_point_exits_non_zero_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--model", "nope", "--data", str(tmp_path), "--out",
         str(tmp_path / "run")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown model 'nope'")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["widths=[8", 'name="x', "widths"])
def test_a_mistyped_arch_argument_is_one_line(tree, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(_train_args(tree, tmp_path / "r", "--arch", value))
    message = _one_line_error(capsys, exit_info.value.code)
    assert "argument --arch:" in message
    assert ("not valid JSON" if "=" in value else "expected KEY=VALUE") in message
    assert not (tmp_path / "r").exists()
