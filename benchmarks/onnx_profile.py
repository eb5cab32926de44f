"""Where a model package's ONNX time goes, node by node: ONNX Runtime's own profiler on each ONNX file.

    python -m benchmarks.onnx_profile --package PACKAGE [--batch-sizes 1,16] [--runs 200] [--out FILE.md]

Each ONNX file of the package (model.onnx, and model.int8.onnx when there is one) runs `--runs` times at each
batch size in a session made by `inference.runtime.onnx_session` (the service's settings), with profiling on;
the files take turns run by run. The report gives the run time (median and mean), each node's mean kernel time
and what is left over: the mean run time that no node accounts for (ONNX Runtime's per-run and per-node
overhead), the part that a faster kernel cannot remove. Pixels are random: a CNN's kernel times do not depend on
the image. Profiling adds its own cost, so compare within a report, and take throughput figures from
benchmarks/export_formats.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from inference.files import atomic_write
from inference.package import INPUT_NAME, PackageError, load_package
from inference.runtime import CPU_PROVIDER, cpu_threads, onnx_session

ONNX_BACKENDS = ("onnx", "onnx-int8")
WARM_UP_RUNS = 20  # first runs allocate buffers; left out of the statistics


@dataclass(frozen=True)
class NodeTime:
    op_type: str
    name: str
    microseconds: float  # mean kernel time per run


@dataclass(frozen=True)
class Profile:
    backend: str
    batch_size: int
    run_microseconds: float  # mean over the measured runs (the nodes' times are means too)
    median_run_microseconds: float
    nodes: list[NodeTime]  # slowest first

    @property
    def kernel_microseconds(self) -> float:
        return sum(node.microseconds for node in self.nodes)


def profile_package(models: dict[str, Path], batches: list[np.ndarray], runs: int, threads: int) -> list[Profile]:
    """Profile every model (backend -> ONNX file) at every batch; the models take turns run by run, so that a
    change in the machine's load falls on all of them alike."""
    with tempfile.TemporaryDirectory(prefix="onnx-profile-") as scratch:
        sessions = {
            backend: onnx_session(path, [CPU_PROVIDER], threads, profile_prefix=str(Path(scratch) / backend))
            for backend, path in models.items()
        }
        for pixels in batches:
            for _ in range(WARM_UP_RUNS + runs):
                for session in sessions.values():
                    session.run(None, {INPUT_NAME: pixels})
        traces = {backend: json.loads(Path(s.end_profiling()).read_text()) for backend, s in sessions.items()}
    return [
        summarise(traces[backend], backend, len(pixels), first_run=k * (WARM_UP_RUNS + runs) + WARM_UP_RUNS, runs=runs)
        for backend in models
        for k, pixels in enumerate(batches)
    ]


def summarise(events: list[dict], backend: str, batch_size: int, first_run: int, runs: int) -> Profile:
    """ONNX Runtime's trace events -> the Profile of runs first_run .. first_run + runs - 1 (counted from 0)."""
    run_events = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    measured = run_events[first_run : first_run + runs]
    if len(measured) < runs:
        raise ValueError(
            f"the profile holds {len(run_events)} runs; runs {first_run}..{first_run + runs - 1} asked for"
        )
    # A session's trace holds only its own runs, one after another: the measured runs' nodes are those between
    # the first one's start and the last one's end.
    begin, end = measured[0]["ts"], measured[-1]["ts"] + measured[-1]["dur"]
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        if begin <= event["ts"] <= end:
            totals[(event["args"]["op_name"], name.removesuffix("_kernel_time"))] += event["dur"]
    nodes = [NodeTime(op, name, total / runs) for (op, name), total in totals.items()]
    nodes.sort(key=lambda node: node.microseconds, reverse=True)
    durations = [e["dur"] for e in measured]
    return Profile(backend, batch_size, statistics.fmean(durations), statistics.median(durations), nodes)


def report(package: Path, profiles: list[Profile], threads: int, runs: int, command: str) -> str:
    lines = [
        "# ONNX Runtime profile, node by node",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; package `{package}`",
        f"- Machine: {cpu_threads()} cores, CPU provider, {threads} intra-op threads; {runs} profiled runs per cell "
        f"after {WARM_UP_RUNS} of warm-up; random pixels. Times in microseconds per run, profiler's cost included.",
        "",
        "| file | batch | median run | mean run | sum of kernels (means) | not in any kernel |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in profiles:
        overhead = p.run_microseconds - p.kernel_microseconds
        lines.append(
            f"| {p.backend} | {p.batch_size} | {p.median_run_microseconds:.0f} | {p.run_microseconds:.0f} "
            f"| {p.kernel_microseconds:.0f} | {overhead:.0f} |"
        )
    for p in profiles:
        lines += ["", f"## {p.backend}, batch {p.batch_size}", "", "| op | node | µs per run |", "|---|---|---:|"]
        lines += [f"| {n.op_type} | `{n.name}` | {n.microseconds:.1f} |" for n in p.nodes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="model package folder")
    parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (default: 1,16)")
    parser.add_argument("--runs", type=int, default=200, help="profiled runs per file and batch size")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: print it)")
    args = parser.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if args.runs < 1 or any(b < 1 for b in batch_sizes):
        parser.error("--runs and every batch size must be at least 1")
    try:
        package = load_package(args.package)  # verifies every file's sha256
    except (PackageError, FileNotFoundError) as exc:  # a CLI: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or cpu_threads()
    height, width = package.spec.input_size
    rng = np.random.default_rng(0)
    models = {backend: package.model_path(backend) for backend in ONNX_BACKENDS if backend in package.backends}
    batches = [rng.integers(0, 256, (b, height, width, 3), dtype=np.uint8) for b in batch_sizes]
    profiles = profile_package(models, batches, args.runs, threads)
    command = "python -m benchmarks.onnx_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(args.package, profiles, threads, args.runs, command)
    if args.out is None:
        print(text, end="")
    else:
        with atomic_write(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
