"""What the benchmark scripts share: test images from the archive, paths, the machine, packages, and report files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.servers import REPO
from inference.files import atomic_write

DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # the offline copy beside the repo
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "benchmarks" / "results"
LOGS = CACHE / "logs"  # the servers' output
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


# ---- data ------------------------------------------------------------------------------------------------------


def labelled_test_jpegs(archive: Path, count: int, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(member name, class, JPEG bytes) of `count` test images drawn at random (seeded) from the archive's
    test/<class>/ members (a seeded permutation of all of them, so a smaller count is a prefix of a larger one's)."""
    members = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if "test" not in parts or not member.isfile() or not member.name.endswith(".jpg"):
                continue
            members.append((member.name, parts[-2], tar.extractfile(member).read()))
    if not members:
        raise ValueError(f"{archive} has no test/<class>/*.jpg members")
    return [members[i] for i in np.random.default_rng(seed).permutation(len(members))[:count]]


def read_test_jpegs(archive: Path, count: int, seed: int = 0) -> list[bytes]:
    """`count` encoded JPEGs drawn at random (seeded) from the archive's test/<class>/ members."""
    return [blob for _, _, blob in labelled_test_jpegs(archive, count, seed)]


def decode_all(blobs: list[bytes], size: tuple[int, int]) -> np.ndarray:
    from inference.imaging import decode_image

    return np.stack([decode_image(blob, size) for blob in blobs])


# ---- machine ---------------------------------------------------------------------------------------------------


def provenance(results: dict) -> str:
    """The report line saying what ran, when and where: its command, date, cores, CPU and load at the start."""
    machine_info = results["machine"]
    return (
        f"`{results['command']}` on {results['date']}; {machine_info['nproc']} cores, {machine_info['cpu_model']}, "
        f"load average at start {machine_info['load_average_at_start']}."
    )


def machine() -> dict:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],  # 1, 5, 15 min: other users' work
    }


# ---- packages --------------------------------------------------------------------------------------------------


def describe_spec(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())["spec"]


def describe_package(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    source = manifest.get("source", {})
    accuracy = source.get("training_metrics", {}).get("test_accuracy")
    return {
        "path": str(root),
        "name": manifest["name"],
        "version": manifest["version"],
        "arch": manifest["spec"]["arch"],
        "weights": "trained" if accuracy is not None else "random (untrained)",
        "training_test_accuracy": accuracy,
    }


# ---- report ----------------------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def run_and_report(
    run: Callable[[argparse.Namespace], dict], markdown: Callable[[dict], str], args: argparse.Namespace
) -> int:
    """A benchmark's main: `run(args)`, then its markdown report at args.out and the figures as JSON beside it,
    each written atomically; exit status 1 with a one-line error if the run fails (a server that would not start,
    wrk failing, an unreadable archive)."""
    try:
        results = run(args)
    except (OSError, ValueError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_atomic(args.out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    write_atomic(args.out, markdown(results))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0
