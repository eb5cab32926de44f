"""`python -m export`: flags -> ExportConfig -> export_package; one-line errors, the gate's figures on failure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.onnx_export import DEFAULT_OPSET
from export.pipeline import FORMATS, ExportConfig, ExportError, GateFailed, export_package

EXIT_ERROR = 1
EXIT_GATE_FAILED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a training run to a verified model package (ONNX, optional int8 ONNX, TorchScript).",
    )
    parser.add_argument("--run", type=Path, required=True, help="training run folder (holds checkpoint.pt)")
    parser.add_argument("--out", type=Path, required=True, help="package folder to create")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"comma-separated fp32 formats from {', '.join(FORMATS)} (onnx is required; default: all)",
    )
    parser.add_argument("--int8", action="store_true", help="also write model.int8.onnx (static int8, QDQ)")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flip test-time augmentation inside the graph (twice the compute); default: as the run was evaluated",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument(
        "--calibration-size",
        type=int,
        default=512,
        help="training images to calibrate the int8 ranges on",
    )
    parser.add_argument("--data", help="data source for parity, calibration and accuracy (default: the run's)")
    parser.add_argument(
        "--eval-limit",
        type=int,
        help="test images for the accuracy figures (default: the whole test split)",
    )
    parser.add_argument("--parity-images", type=int, default=1000, help="test images compared with eager PyTorch")
    parser.add_argument(
        "--parity-batch",
        type=int,
        default=33,
        help="the larger, odd batch size of the parity check (besides 1)",
    )
    parser.add_argument("--name", help="package name (default: the run folder's name, lowercased)")
    parser.add_argument("--version", help="package version (default: a UTC timestamp)")
    parser.add_argument("--no-bentoml", action="store_true", help="do not register in the BentoML model store")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing package folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation/parity/calibration samples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ExportConfig(
        run_dir=args.run,
        out_dir=args.out,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        int8=args.int8,
        tta=args.tta,
        opset=args.opset,
        calibration_size=args.calibration_size,
        data=args.data,
        eval_limit=args.eval_limit,
        parity_images=args.parity_images,
        parity_batch=args.parity_batch,
        name=args.name,
        version=args.version,
        bentoml=not args.no_bentoml,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    try:
        result = export_package(config, progress=lambda message: print(f"export: {message}", file=sys.stderr))
    except GateFailed as failure:
        print(failure.report.table(), file=sys.stderr)
        print(f"error: parity gate failed; nothing was published at {args.out}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except (ExportError, *_input_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(result.report.table())
    where = f" and BentoML model {result.bentoml_tag}" if result.bentoml_tag else ""
    print(f"wrote {result.package_dir} ({', '.join(result.manifest['files'])}){where}")
    return 0


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (a missing run, an unreadable data source), not a bug: one line, no traceback."""
    from export.model_store import ModelStoreError
    from inference.package import PackageError
    from training.checkpoint import CheckpointError
    from training.data import DataError

    return (CheckpointError, DataError, PackageError, ModelStoreError)
