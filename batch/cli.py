"""Batch scoring CLI: `python -m batch --model PACKAGE --input INPUT --output OUTPUT` (or `visionserve-batch`).

Exit status: 0 when every input was scored (or --allow-failures), 1 when some inputs became error rows or the
job stopped part-way (the output's parts stay for --resume), 2 for bad arguments, inputs, outputs or packages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from batch.engines.local import POOLS
from batch.job import DEFAULT_TOP_K, BatchJob
from inference.package import BACKEND_FILES
from inference.runtime import DEVICES

# The job's heavy modules (pyarrow, httpx, tqdm, Ray) are imported when it runs, not here: spawned decoding
# workers re-import the main module, and need none of them.

PROG = "visionserve-batch"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage dump -> one line, exit 2
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog=PROG,
        description="Score a folder, archive, Parquet file or list of images with a model package.",
    )
    p.add_argument(
        "--model",
        help="model package folder (manifest.json + model files); with --url, a model the service serves by name",
    )
    p.add_argument(
        "--input",
        required=True,
        help="folder (recursive), .tar/.tar.gz/.tgz, .parquet, or .txt list of paths",
    )
    p.add_argument("--output", required=True, type=Path, help="output file: .parquet or .csv")
    p.add_argument(
        "--engine",
        default=BatchJob.engine,
        choices=("local", "ray"),
        help="local process pool or Ray Data (default %(default)s)",
    )
    p.add_argument("--url", help="score through a running service's /classify_batch instead of a local model")
    p.add_argument(
        "--top-k", type=int, help=f"labels per row (default: {DEFAULT_TOP_K}, or the class count if smaller)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=BatchJob.batch_size,
        help="images per inference call or request (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="decoding workers (local; 0 decodes inline), predictor actors (ray), or concurrent requests (url)",
    )
    p.add_argument(
        "--pool",
        default=BatchJob.pool,
        choices=POOLS,
        help="local decoding workers: processes or threads (default %(default)s)",
    )
    p.add_argument(
        "--backend",
        default=BatchJob.backend,
        choices=tuple(BACKEND_FILES),
        help="model file to run (default %(default)s)",
    )
    p.add_argument(
        "--device",
        default=BatchJob.device,
        choices=DEVICES,
        help="auto: CUDA if usable, else CPU with a warning",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="TF32 on the GPU: faster on Ampere and later, outputs no longer within 1e-4 of the verified float32",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="ONNX Runtime intra-op threads (default: all cores locally, 1 per Ray actor)",
    )
    p.add_argument(
        "--rows-per-part",
        type=int,
        default=BatchJob.rows_per_part,
        help="rows per atomically written output part (default %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="complete the unfinished output of an earlier, interrupted run",
    )
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some inputs became error rows",
    )
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--id-column", default=BatchJob.id_column, help="Parquet input: the id column (default %(default)s)")
    p.add_argument(
        "--image-column",
        default=BatchJob.image_column,
        help="Parquet input: the image-bytes column (default %(default)s)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from batch.engines.base import EngineError
    from batch.engines.remote import JobRefused, RemoteError
    from batch.inputs import InputError
    from batch.job import JobError, run_job
    from batch.output import OutputError
    from inference.package import PackageError
    from inference.runtime import DeviceUnavailableError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    job = BatchJob(
        input=args.input,
        output=args.output,
        model=args.model,
        url=args.url,
        engine=args.engine,
        top_k=args.top_k,
        batch_size=args.batch_size,
        workers=args.workers,
        pool=args.pool,
        backend=args.backend,
        device=args.device,
        tf32=args.tf32,
        threads=args.threads,
        rows_per_part=args.rows_per_part,
        resume=args.resume,
        ray_address=args.ray_address,
        id_column=args.id_column,
        image_column=args.image_column,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        summary = run_job(job, progress=progress)
    except (JobError, InputError, OutputError, PackageError, DeviceUnavailableError, EngineError, JobRefused) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RemoteError as exc:
        print(
            f"{PROG}: error: {exc}; the rows so far are kept, rerun with --resume to continue",
            file=sys.stderr,
        )
        return 1
    print(summary.line(), file=sys.stderr)
    if summary.failed and not args.allow_failures:
        print(
            f"{PROG}: {summary.failed} inputs could not be scored (see the error column); exit 1",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
