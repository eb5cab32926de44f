"""`python -m training {train,evaluate,models,compare}`: flags in, importable functions called, one-line errors out."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from training.checkpoint import CheckpointError
from training.config import (
    DEVICES,
    OPTIMIZERS,
    SCHEDULES,
    TRANSFER_MODES,
    TrainConfig,
    TrainingError,
    resumed_config,
)
from training.data import DataError

log = logging.getLogger("training")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


TRAIN_EXAMPLES = """examples:
  python -m training train --model cnn_bn --data cifar10-jpeg.tar.gz --epochs 10 --out runs/cnn_bn
  python -m training train --recipe quick --data cifar10-jpeg.tar.gz --out runs/quick  # see `recipes`
  python -m training train --recipe lesson --model cnn_plain --data cifar10-jpeg.tar.gz --out runs/plain
  python -m training train --out runs/cnn_bn --resume            # after a crash or kill
  python -m training train --out runs/cnn_bn --resume --epochs 20  # extend a finished run
  python -m training train --model resnet18_transfer --pretrained imagenet --mode frozen \\
      --data cifar10-jpeg.tar.gz --epochs 3 --out runs/r18_frozen
  airbench's ingredients: --model airbench --label-smoothing 0.2 --nesterov --ema --tta --bn-bias-lr-scale N
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the train usage alone would be a screenful)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _input_size(text: str) -> tuple[int, int]:
    """'64' -> (64, 64); '64x48' -> (64, 48) as (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH in pixels, got {text!r}")
    return parts[0], parts[1]


def _arch_kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as exc:
        if value.lstrip()[:1] in ("[", "{", '"'):  # meant as JSON, mistyped: say so, don't pass the text on
            raise argparse.ArgumentTypeError(f"{key}={value!r}: the value is not valid JSON ({exc.msg})") from None
        return key, value  # a bare string


def _class_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    # Every default is argparse.SUPPRESS, so that the flags given can be told apart: a resumed run takes the
    # saved config and only those. The real defaults live in TrainConfig and are shown in the help.
    def flag(*names: str, help: str, **kwargs: Any) -> None:
        dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
        default = DEFAULTS.get(dest)
        shown = f" (default: {default})" if dest in DEFAULTS and default not in (None, {}) else ""
        p.add_argument(*names, help=help + shown, default=argparse.SUPPRESS, **kwargs)

    toggle = argparse.BooleanOptionalAction
    flag(
        "--recipe",
        help="start from a named preset of these flags (`python -m training recipes`); flags given override it",
    )
    flag("--model", help="architecture name from `python -m training models`")
    flag(
        "--data",
        help="'cifar10' (download), a folder with train/<class>/ and test/<class>/, or a .tar.gz of one",
    )
    flag("--out", help="run folder for the checkpoint, config, history, metrics and plots")
    flag("--epochs", type=_positive_int, help="epochs to train (with --resume: extends the run)")
    flag("--batch-size", type=_positive_int, help="images per optimizer step")
    flag("--optimizer", choices=OPTIMIZERS, help="optimizer")
    flag("--lr", type=float, help="peak learning rate, reached at the end of warmup")
    flag("--weight-decay", type=float, help="weight decay, not applied to BN or bias parameters")
    flag("--momentum", type=float, help="SGD momentum (Adam/AdamW: beta1)")
    flag("--nesterov", action=toggle, help="Nesterov momentum for SGD")
    flag(
        "--schedule",
        choices=SCHEDULES,
        help="learning-rate schedule, stepped every iteration after linear warmup",
    )
    flag(
        "--warmup-epochs",
        type=float,
        help="epochs of linear learning-rate warmup (fractions allowed)",
    )
    flag("--label-smoothing", type=float, help="label smoothing of the training loss")
    flag(
        "--augment",
        action=toggle,
        help="random flips, rotation, shifts, crops, brightness and contrast",
    )
    flag("--flip", action=toggle, help="augmentation: random horizontal flips")
    flag("--rotate-degrees", type=float, help="augmentation: random rotation in +-degrees (0: off)")
    flag("--translate", type=float, help="augmentation: random shift, fraction of size (0: off)")
    flag("--crop-padding", type=int, help="augmentation: padded random crop, pixels (0: off)")
    flag("--brightness", type=float, help="augmentation: brightness factor in 1 +- this (0: off)")
    flag("--contrast", type=float, help="augmentation: contrast factor in 1 +- this (0: off)")
    flag("--seed", type=int, help="seed of the initial weights, data order and augmentation")
    flag("--device", choices=DEVICES, help="auto: CUDA when available, else CPU")
    flag(
        "--amp",
        action=toggle,
        help="bfloat16 mixed precision for training steps, on CUDA or a CPU with AMX / AVX512-BF16 "
        "(elsewhere ignored with a warning); evaluation stays float32",
    )
    flag("--channels-last", action=toggle, help="channels_last memory format (faster convolutions)")
    flag(
        "--input-size",
        type=_input_size,
        help="SIZE or HEIGHTxWIDTH the images are decoded at (default: the model's)",
    )
    flag("--arch", dest="arch_kwargs", type=_arch_kwarg, action="append", metavar="KEY=VALUE",
         help="architecture argument, repeatable, VALUE in JSON, e.g. --arch widths=[32,64,64] for airbench")  # fmt: skip
    flag(
        "--ema",
        action=toggle,
        help="evaluate and export an exponential moving average of the weights",
    )
    flag("--ema-decay", type=float, help="EMA decay per optimizer step")
    flag(
        "--tta",
        action=toggle,
        help="evaluate on each image and its mirror image, averaging the logits",
    )
    flag(
        "--bn-bias-lr-scale",
        type=float,
        help="learning-rate multiplier of BN biases (airbench uses ~64)",
    )
    flag(
        "--pretrained",
        help="initial backbone weights: 'imagenet' (torchvision), a state-dict file or a run's checkpoint.pt",
    )
    flag(
        "--pretrained-sha256",
        help="expected sha256 of the --pretrained file (refused when it differs)",
    )
    flag(
        "--mode",
        choices=TRANSFER_MODES,
        help="with --pretrained: finetune all layers, or train only the new head",
    )
    flag("--backbone-lr-scale", type=float, help="finetune: backbone learning rate = lr x this")
    flag("--num-threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    flag(
        "--train-per-class",
        type=_positive_int,
        help="few-label training: this many training images per class",
    )
    flag(
        "--classes",
        type=_class_list,
        metavar="NAME,NAME,...",
        help="train and test on these classes only",
    )
    flag("--cache-dir", help="where decoded dataset arrays are cached")
    flag("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    flag("--progress", action=toggle, help="progress bars on stderr")
    p.add_argument("--report", action=toggle, default=True, help="write plots/*.png at the end (default: True)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m training", description="Train, evaluate and compare image classifiers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a model into a run folder",
        description="Train a model into a run folder, checkpointing after every epoch.",
        epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_flags(train)

    evaluate = commands.add_parser("evaluate", help="accuracy of a run's checkpoint on a dataset's test split")
    evaluate.add_argument("--run", required=True, help="run folder (or its checkpoint.pt)")
    evaluate.add_argument("--data", required=True, help="dataset source, as for train --data")
    evaluate.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                          help="flip test-time augmentation (default: as the run was trained)")  # fmt: skip
    evaluate.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto: CUDA when available (default: auto)",
    )
    evaluate.add_argument(
        "--batch-size",
        type=_positive_int,
        default=500,
        help="images per forward pass (default: 500)",
    )
    evaluate.add_argument("--cache-dir", default=DEFAULTS["cache_dir"], help="decoded dataset cache")
    evaluate.add_argument("--json", type=Path, help="also write the metrics to this JSON file")

    commands.add_parser("models", help="list the registered architectures")
    commands.add_parser("recipes", help="list the named training recipes and their settings")

    compare = commands.add_parser("compare", help="compare finished runs: markdown table and overlay plot")
    compare.add_argument("runs", nargs="+", type=Path, help="run folders")
    compare.add_argument("--out", required=True, type=Path, help="folder for comparison.md and comparison.png")
    return parser


def run_train(args: argparse.Namespace) -> None:
    from training import engine

    given = {k: v for k, v in vars(args).items() if k not in ("command", "report")}
    if "arch_kwargs" in given:
        given["arch_kwargs"] = dict(given["arch_kwargs"])
    if "recipe" in given:
        from training.recipes import apply_recipe

        given = apply_recipe(given.pop("recipe"), given)
    if given.get("resume"):
        if "out" not in given:
            raise TrainingError("--resume needs --out RUN_DIR")
        from training.checkpoint import load_checkpoint

        checkpoint_file = Path(given["out"]) / "checkpoint.pt"
        if not checkpoint_file.is_file():
            raise TrainingError(f"cannot resume: no checkpoint at {checkpoint_file}")
        config = resumed_config(load_checkpoint(checkpoint_file).config, given)
    else:
        missing = [f"--{name}" for name in ("model", "data", "out") if name not in given]
        if missing:
            raise TrainingError(f"train needs {', '.join(missing)}")
        config = TrainConfig(**given)

    result = engine.train(config)
    metrics = result.metrics
    print(
        f"{config.model}: test accuracy {metrics['test_accuracy']:.4f} (loss {metrics['test_loss']:.4f}) after "
        f"{metrics['epochs']} epochs, {metrics['train_seconds']:.0f} s of training; run folder {result.run_dir}"
    )
    if args.report:
        _write_report(result)


def _write_report(result) -> None:
    try:
        from training.reports import write_run_report
    except ImportError as exc:  # matplotlib is optional for training itself
        log.warning("no plots written (%s)", exc)
        return
    plots = write_run_report(
        result.run_dir,
        history=result.history,
        model=result.model,
        spec=result.spec,
        test_images=result.test_images,
        test_labels=result.test_labels,
        probabilities=result.evaluation.probabilities,
    )
    print(f"plots: {', '.join(str(p) for p in plots)}")


def run_evaluate(args: argparse.Namespace) -> None:
    from training import engine

    evaluation, checkpoint, count = engine.evaluate_run(
        args.run, args.data, cache_dir=Path(args.cache_dir), device=args.device, tta=args.tta,
        batch_size=args.batch_size,
    )  # fmt: skip
    print(
        f"{checkpoint.spec.arch} (epoch {checkpoint.epoch}): accuracy {evaluation.accuracy:.4f} "
        f"(loss {evaluation.loss:.4f}) on {count} test images of {args.data}"
    )
    if args.json is not None:
        engine.write_json_atomic(
            args.json,
            {"run": str(args.run), "data": args.data, "test_accuracy": evaluation.accuracy,
             "test_loss": evaluation.loss, "images": count},
        )  # fmt: skip


def run_models(args: argparse.Namespace) -> None:
    from training.models import build_model, list_models

    rows = []
    for info in list_models():
        parameters = sum(p.numel() for p in build_model(info.name, 10).parameters())
        size = "x".join(map(str, info.input_size))
        rows.append((info.name, f"{parameters:,}", size, info.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{'model':<{widths[0]}}  {'params':>{widths[1]}}  {'input':<{widths[2]}}  description")
    for name, parameters, size, description in rows:
        print(f"{name:<{widths[0]}}  {parameters:>{widths[1]}}  {size:<{widths[2]}}  {description}")
    print("(parameters with a 10-class head)")


def run_recipes(args: argparse.Namespace) -> None:
    from training.recipes import RECIPES

    for recipe in RECIPES.values():
        print(f"{recipe.name}: {recipe.description}")
        settings = (f"{key}={json.dumps(value)}" for key, value in recipe.settings.items())
        print("  " + " ".join(settings))


def run_compare(args: argparse.Namespace) -> None:
    from training.reports import compare_runs

    try:
        print(compare_runs(args.runs, args.out))
    except ValueError as exc:  # reports' one-line messages about unusable run folders
        raise TrainingError(str(exc)) from None


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "models": run_models,
    "recipes": run_recipes,
    "compare": run_compare,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        COMMANDS[args.command](args)
    except (TrainingError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions... still one line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; continue a training run with --resume", file=sys.stderr)
        return 130
    return 0
