"""The whole CIFAR-10 test set through a running service's /classify_batch: accuracy vs the offline evaluation.

    python -m benchmarks.service_accuracy --package PACKAGE

Starts `bentoml serve` on a free 127.0.0.1 port with the package, times start to /readyz, sends the 10,000 test
JPEGs in batches with `python -m batch --url` (the batch scoring client), computes top-1 accuracy from the
output file and compares it with the accuracy the export stage measured offline (manifest metrics.onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from batch.job import BatchJob, run_job
from benchmarks.batch_scoring import CACHE, DEFAULT_ARCHIVE, output_accuracy, test_split
from benchmarks.common import machine
from benchmarks.servers import SERVICE, BentoServer
from inference.files import atomic_write

RESULTS = Path(__file__).resolve().parent / "results" / "service_accuracy.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="model package folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive")
    parser.add_argument("--batch-size", type=int, default=64, help="images per /classify_batch request")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args(argv)

    manifest = json.loads((args.package / "manifest.json").read_text())
    offline = manifest["metrics"]["onnx"]["test_accuracy"]
    folder, _ = test_split(args.data)
    output = CACHE / "outputs" / "service-classify-batch.parquet"
    output.unlink(missing_ok=True)
    host = machine()
    env = {"VISIONSERVE_MODEL": str(args.package.resolve())}
    with BentoServer(SERVICE, env, CACHE / "logs", "service") as server:
        started = time.perf_counter()
        summary = run_job(
            BatchJob(input=str(folder), output=output, url=server.url, top_k=1, batch_size=args.batch_size)
        )
        seconds = time.perf_counter() - started
        ready_seconds = server.ready_seconds
    online = output_accuracy(output)
    lines = [
        "# The CIFAR-10 test set through /classify_batch vs the offline evaluation",
        "",
        f"- Command: `python -m benchmarks.service_accuracy --package {args.package}`",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Machine: {host['nproc']} cores ({host['cpu_model']}), no GPU; 1-minute load average "
        f"{host['load_average_at_start'][0]} at the start, {os.getloadavg()[0]:.2f} at the end (shared machine)",
        f"- Package: {manifest['name']} {manifest['version']} ({manifest['spec']['arch']})",
        "",
        "| what | value |",
        "|---|---|",
        f"| images sent (multipart `images`, {args.batch_size} per request) | {summary.scored + summary.failed} |",
        f"| failed | {summary.failed} |",
        f"| accuracy from /classify_batch, CIFAR-10 (JPEG q75) | {online:.4f} |",
        f"| offline accuracy (export stage, same ONNX file) | {offline:.4f} |",
        f"| equal | {'yes' if abs(online - offline) < 1e-9 else 'NO'} |",
        f"| images/s through the service (client and server on the same 2 cores) | {(summary.scored + summary.failed) / seconds:.0f} |",
        f"| process start to /readyz = 200 | {ready_seconds:.1f} s |",
        "",
    ]
    with atomic_write(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0 if abs(online - offline) < 1e-9 and summary.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
