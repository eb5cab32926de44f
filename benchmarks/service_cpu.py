"""Where the cores go under load: the CPU of each server thread and of the load generator, per request.

    python -m benchmarks.service_cpu --small-package PKG --resnet-package PKG [--concurrency 32] [--rounds 5]

The load test (load_test.py) says how fast each server is; this says why it is not faster. The no-op (with
BentoML's defaults; noop-h11 the same on uvicorn's pure-Python HTTP stack, without the httptools and uvloop that
the service installs; noop-tuned with the service's settings of the framework), the small CNN and the ResNet-18
servers (one model instance, and two: resnet18-2i) take turns under the same closed-loop wrk load, round after
round, with the raw engine (ResNet-18's ONNX Runtime session in this process, no server busy; the faster of one
call and two side by side) measured in each round too. Per phase it reads, from /proc through psutil, the CPU
time of every thread of the server's processes over the measured window, split into the event loops (each
process's main thread: HTTP, parsing, decoding, JSON) and the rest (the model thread, ONNX Runtime's pool, decode
threads), and wrk's CPU time (its rusage). Also measured: the CPU time of inference.imaging.decode_image per test
JPEG, which the service spends on the event loop.

From these it derives each issue-4 target's ceiling on this machine:
- small CNN vs no-op: both servers are bound by one event loop (a core busy); /classify's loop does the work of
  the no-op with the same settings (noop-tuned) plus at least the decoding, so its requests/s cannot exceed
  noop_ms / (noop_ms + decode_ms) of that no-op's (decoding in a thread would still hold the GIL for Pillow's
  Python-level parsing, most of its time);
- ResNet-18 vs the raw engine: the raw engine has every core, the service leaves ONNX Runtime what its event loop
  and the load generator do not use: (cores - loop - wrk) / cores of the engine's images/s at best.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from benchmarks.common import (
    CACHE,
    DEFAULT_ARCHIVE,
    LOGS,
    RESULTS,
    decode_all,
    describe_package,
    describe_spec,
    machine,
    read_test_jpegs,
    run_and_report,
)
from benchmarks.decode import cpu_us_per_image
from benchmarks.loadgen import write_image_files, wrk_closed_loop
from benchmarks.raw_engine import ENGINE_CALLS, best, engine_predictor, measure_engine
from benchmarks.servers import NOOP_SERVICE, NOOP_SERVICE_SETTINGS, SERVICE, BentoServer
from inference.imaging import decode_image

ENGINE_BATCH_SIZES = (32, 64, 128)  # the best batch sizes in the load test's runs: 32 for two calls, 64-128 for one


def thread_cpu(root_pid: int) -> dict[str, float]:
    """CPU seconds so far of the process tree's event loops (main threads) and of all its other threads.

    "other" is each process's total less its main thread: the total keeps the time of threads that have ended.
    """
    totals = {"loop": 0.0, "other": 0.0}
    root = psutil.Process(root_pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                main = next((t for t in process.threads() if t.id == process.pid), None)
        except psutil.NoSuchProcess:  # a worker that ended meanwhile: its time is lost to both sides
            continue
        loop = main.user_time + main.system_time if main else 0.0
        totals["loop"] += loop
        totals["other"] += times.user + times.system - loop
    return totals


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_phase(server: BentoServer, listing: Path, concurrency: int, duration: float, warmup: float) -> dict:
    """One wrk phase with the CPU accounting of its measured window (the warm-up runs before the window)."""
    url = f"{server.url}/classify"
    if warmup > 0:
        wrk_closed_loop(server.name, url, listing, concurrency, warmup, 0)
    threads_before, wrk_before, started = thread_cpu(server.process.pid), children_cpu(), time.perf_counter()
    phase = wrk_closed_loop(server.name, url, listing, concurrency, duration, 0)
    wall = time.perf_counter() - started
    threads_after, wrk_after = thread_cpu(server.process.pid), children_cpu()
    loop = (threads_after["loop"] - threads_before["loop"]) / wall
    other = (threads_after["other"] - threads_before["other"]) / wall
    client = (wrk_after - wrk_before) / wall
    rate = phase.requests_per_second
    return {
        "requests_per_second": rate,
        "errors": phase.requests - phase.ok,
        "loop_cores": round(loop, 3),
        "other_cores": round(other, 3),
        "wrk_cores": round(client, 3),
        "loop_ms_per_request": round(1000 * loop / rate, 3) if rate else None,
        "server_ms_per_request": round(1000 * (loop + other) / rate, 3) if rate else None,
    }


def pure_python_http_stack() -> dict[str, str]:
    """The environment of a server on uvicorn's pure-Python HTTP stack (h11 and asyncio's event loop), as if the
    serving dependencies httptools and uvloop were not installed: a folder first on its PYTHONPATH whose modules
    of those names fail to import (uvicorn then falls back, as it does when they are missing)."""
    folder = CACHE / "without-httptools-uvloop"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("httptools", "uvloop"):
        (folder / f"{name}.py").write_text(f'raise ImportError("{name} hidden by benchmarks/service_cpu.py")\n')
    return {"PYTHONPATH": str(folder)}


def decode_ms(blobs: list[bytes], size: tuple[int, int]) -> float:
    """CPU milliseconds of decode_image per image, the mean over `blobs`."""
    return cpu_us_per_image(lambda blob: decode_image(blob, size), blobs) / 1000


def run(args: argparse.Namespace) -> dict:
    images = read_test_jpegs(args.data, args.images)
    listing = write_image_files(images, CACHE / "wrk-images")
    cores = len(os.sched_getaffinity(0))
    size = tuple(describe_spec(args.small_package)["input_size"])
    pixels = decode_all(images[:512], tuple(describe_spec(args.resnet_package)["input_size"]))
    results: dict = {
        "command": " ".join(["python -m benchmarks.service_cpu", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "cores": cores,
        "settings": {"concurrency": args.concurrency, "duration_s": args.duration, "rounds": args.rounds},
        "packages": {"small": describe_package(args.small_package), "resnet": describe_package(args.resnet_package)},
        "decode_ms": round(decode_ms(images, size), 4),
        "rounds": [],
    }
    env = {"VISIONSERVE_DEVICE": "cpu"}
    servers = {
        "noop-h11": BentoServer(NOOP_SERVICE, pure_python_http_stack(), LOGS, "cpu-noop-h11"),
        "noop": BentoServer(NOOP_SERVICE, {}, LOGS, "cpu-noop"),
        "noop-tuned": BentoServer(NOOP_SERVICE, {NOOP_SERVICE_SETTINGS: "1"}, LOGS, "cpu-noop-tuned"),
        "small-cnn": BentoServer(SERVICE, {**env, "VISIONSERVE_MODEL": str(args.small_package)}, LOGS, "cpu-small"),
        "resnet18": BentoServer(SERVICE, {**env, "VISIONSERVE_MODEL": str(args.resnet_package)}, LOGS, "cpu-resnet"),
        "resnet18-2i": BentoServer(
            SERVICE,
            {**env, "VISIONSERVE_MODEL": str(args.resnet_package), "VISIONSERVE_MODEL_INSTANCES": "2"},
            LOGS,
            "cpu-resnet-2i",
        ),
    }
    predictors = {calls: engine_predictor(args.resnet_package, calls) for calls in ENGINE_CALLS}
    try:
        for server in servers.values():
            server.start()
        for index in range(args.rounds):
            # The machine's limit this round: the faster of one call and two side by side (as the load test).
            engines = {
                calls: best(measure_engine(p, pixels, ENGINE_BATCH_SIZES, seconds=args.engine_seconds, calls=calls))
                for calls, p in predictors.items()
            }
            calls, engine = max(engines.items(), key=lambda item: item[1].images_per_second)
            row = {
                "engine_images_per_second": round(engine.images_per_second, 1),
                "engine_batch": engine.batch_size,
                "engine_calls": calls,
            }
            for name, server in servers.items():
                row[name] = measured_phase(server, listing, args.concurrency, args.duration, args.warmup)
            results["rounds"].append(row)
            print(f"[round {index + 1}] {json.dumps(row)}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return results


def median(rounds: list[dict], path: tuple[str, ...]) -> float:
    values = []
    for row in rounds:
        for key in path:
            row = row[key]
        values.append(row)
    return statistics.median(values)


def markdown(results: dict) -> str:
    m, s, rounds, cores = results["machine"], results["settings"], results["rounds"], results["cores"]
    decode = results["decode_ms"]
    lines = [
        "# Where the cores go: CPU per request of the service's threads under load",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Machine: {cores} cores ({m['cpu_model']}), no GPU; Python {m['python']}. Load average (1/5/15 min) at "
        f"the start {m['load_average_at_start']}. The load generator (wrk) shares the cores with the server.",
        f"- Load: wrk closed loop, {s['concurrency']} connections, {s['duration_s']} s measured per phase; the "
        f"servers take turns, {s['rounds']} rounds, with the raw engine measured in each round. Medians over rounds.",
        "",
        "| server | req/s | event loop (cores) | other threads (cores) | wrk (cores) | unused (cores) "
        "| event loop ms/request | server ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in servers(rounds):
        figures = {
            key: median(rounds, (name, key))
            for key in ("requests_per_second", "loop_cores", "other_cores", "wrk_cores", "loop_ms_per_request",
                        "server_ms_per_request")
        }  # fmt: skip
        unused = cores - figures["loop_cores"] - figures["other_cores"] - figures["wrk_cores"]
        lines.append(
            f"| {name} | {figures['requests_per_second']:.0f} | {figures['loop_cores']:.2f} | "
            f"{figures['other_cores']:.2f} | {figures['wrk_cores']:.2f} | {unused:.2f} | "
            f"{figures['loop_ms_per_request']:.3f} | {figures['server_ms_per_request']:.3f} |"
        )
    engine = median(rounds, ("engine_images_per_second",))
    noop_ms = median(rounds, ("noop-tuned", "loop_ms_per_request"))
    small_vs = {
        noop: [r["small-cnn"]["requests_per_second"] / r[noop]["requests_per_second"] for r in rounds]
        for noop in ("noop", "noop-tuned")
    }
    lines += [
        "",
        f"Raw engine (ResNet-18, this process, the faster of one call and two side by side, best of batch "
        f"{', '.join(map(str, ENGINE_BATCH_SIZES))}): {engine:.0f} images/s (median). decode_image: {decode:.3f} ms "
        "of CPU per test JPEG (mean).",
        "",
        "## Ceilings on this machine",
        "",
        f"- small CNN vs no-op: measured {statistics.median(small_vs['noop']):.1%} "
        f"({', '.join(f'{x:.0%}' for x in small_vs['noop'])}) of the no-op with BentoML's defaults, "
        f"{statistics.median(small_vs['noop-tuned']):.1%} ({', '.join(f'{x:.0%}' for x in small_vs['noop-tuned'])}) "
        f"of noop-tuned; ceiling from decoding alone on the event loop: {noop_ms:.3f} / ({noop_ms:.3f} + "
        f"{decode:.3f}) = **{noop_ms / (noop_ms + decode):.1%}** of noop-tuned (target 90%).",
    ]
    for name in servers(rounds):
        if not name.startswith("resnet18"):
            continue
        vs_engine = [r[name]["requests_per_second"] / r["engine_images_per_second"] for r in rounds]
        ceiling = [(cores - r[name]["loop_cores"] - r[name]["wrk_cores"]) / cores for r in rounds]
        lines.append(
            f"- {name} vs the raw engine: measured {statistics.median(vs_engine):.1%} "
            f"({', '.join(f'{x:.0%}' for x in vs_engine)}); ceiling (cores - event loop - wrk) / cores: "
            f"**{statistics.median(ceiling):.1%}** ({', '.join(f'{x:.0%}' for x in ceiling)}; target 80%)."
        )
    lines.append("")
    return "\n".join(lines)


def servers(rounds: list[dict]) -> list[str]:
    """The servers measured, in the order they ran (resnet18-2i: VISIONSERVE_MODEL_INSTANCES=2)."""
    return [name for name in rounds[0] if not name.startswith("engine_")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-package", type=Path, required=True, help="package of the small CNN")
    parser.add_argument("--resnet-package", type=Path, required=True, help="package of the CIFAR ResNet-18")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 JPEG archive (test/ members)")
    parser.add_argument("--images", type=int, default=2000, help="distinct test JPEGs to cycle through")
    parser.add_argument("--concurrency", type=int, default=32, help="wrk connections")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each phase")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine-seconds", type=float, default=3.0, help="raw engine seconds per batch size")
    parser.add_argument("--out", type=Path, default=RESULTS / "service_cpu.md", help="results markdown (JSON beside)")
    args = parser.parse_args(argv)
    for package in (args.small_package, args.resnet_package):
        if not (package / "manifest.json").is_file():
            print(f"error: {package} is not a model package (no manifest.json)", file=sys.stderr)
            return 2
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
