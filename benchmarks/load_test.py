"""Service load benchmark: closed-loop HTTP clients against real `bentoml serve` processes, side by side in one run.

    python -m benchmarks.load_test [--small-package PKG] [--resnet-package PKG --resnet-run RUN] [--duration 10]

Each server is started here on a free loopback port, timed from process start to /readyz = 200, loaded and
stopped. Requests are single CIFAR-10 test JPEGs (multipart field `image`) sent to POST /classify by `c`
workers that each send the next request as soon as the last one is answered (concurrency 1, 8, 32, 128), by
wrk when it is installed (`apt-get install wrk`: a C client takes far less of the shared cores than Python
would), else by this script's aiohttp client (`--client python`).
Compared in the same run:
- the small CNN's /classify vs a no-op BentoML endpoint taking the same upload (benchmarks/noop_service.py);
- the ResNet-18's /classify vs its raw ONNX Runtime session in-process at its best batch size
  (benchmarks/raw_engine.py), and vs a naive eager-PyTorch service without batching (benchmarks/naive_service.py);
- an open-loop phase at 80% of the ResNet service's saturation rate (no errors expected);
- overload: a server with a small queue driven far above saturation (fast 503s with Retry-After expected), then
  light load again (the p99 should recover).
Without --small-package/--resnet-package, random-weight packages are built first (training.models +
training.checkpoint + `python -m export`) under .cache/bench/. Results: benchmarks/results/service_load.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.random_weights import random_package
from benchmarks.servers import SERVICE, BentoServer
from inference.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # the offline copy beside the repo
CACHE = REPO / ".cache" / "bench"
RESULTS = REPO / "benchmarks" / "results"
LOGS = CACHE / "logs"  # the servers' output
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
NOOP_SERVICE = "benchmarks.noop_service:NoopClassifier"
NOOP_SERVICE_SETTINGS = "VISIONSERVE_NOOP_SERVICE_SETTINGS"  # =1: the no-op with the service's framework settings
WRK_SCRIPT = REPO / "benchmarks" / "wrk_classify.lua"
NAIVE_SERVICE = "benchmarks.naive_service:NaiveClassifier"
ENGINE_CALLS = (1, 2)  # the raw engine as one call, and as two side by side (VISIONSERVE_MODEL_INSTANCES=2)
CLIENTS = {
    "wrk": "wrk (C, one thread; benchmarks/wrk_classify.lua)",
    "python": "this script's aiohttp workers",
}
REQUEST_TIMEOUT_S = 30.0  # client side; a request still unanswered by then counts as "timeout"


# ---- data ----------------------------------------------------------------------------------------------------


def read_test_jpegs(archive: Path, count: int, seed: int = 0) -> list[bytes]:
    """`count` encoded JPEGs drawn at random (seeded) from the archive's test/<class>/ members."""
    blobs = []
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if "test" not in parts or not member.isfile() or not member.name.endswith(".jpg"):
                continue
            blobs.append(tar.extractfile(member).read())
    if not blobs:
        raise ValueError(f"{archive} has no test/<class>/*.jpg members")
    order = np.random.default_rng(seed).permutation(len(blobs))[:count]
    return [blobs[i] for i in order]


def decode_all(blobs: list[bytes], size: tuple[int, int]) -> np.ndarray:
    from inference.imaging import decode_image

    return np.stack([decode_image(blob, size) for blob in blobs])


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


# ---- load ------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One load phase's figures; latencies in milliseconds.

    Closed loop: the answers completed inside the measured window. Open loop: the answers to every request
    scheduled inside the window.
    """

    server: str
    kind: str  # closed (c workers) | open (fixed arrival rate)
    concurrency: int  # workers (closed) or the most requests in flight allowed (open)
    seconds: float  # the measured window (after the warm-up)
    requests: int  # answered in the window, any status
    ok: int
    statuses: dict[str, int] = field(default_factory=dict)  # status code (or timeout/connection_error) -> count
    requests_per_second: float = 0.0  # OK answers per second
    p50_ms: float | None = None  # of OK answers
    p95_ms: float | None = None
    p99_ms: float | None = None
    rejected_p50_ms: float | None = None  # of 503/429 answers: rejection should be fast
    rejected_p99_ms: float | None = None
    rejected_with_retry_after: int = 0
    target_rate: float | None = None  # open loop: requests/s sent


def summarise(server: str, kind: str, concurrency: int, seconds: float, samples: list) -> Phase:
    """samples: (latency_s, status, has_retry_after) of the phase's measured answers."""
    statuses = collections.Counter(status for _, status, _ in samples)
    ok = [latency for latency, status, _ in samples if status == "200"]
    rejected = [(latency, retry) for latency, status, retry in samples if status in ("503", "429")]
    phase = Phase(
        server,
        kind,
        concurrency,
        round(seconds, 2),
        len(samples),
        len(ok),
        dict(sorted(statuses.items())),
    )
    phase.requests_per_second = round(len(ok) / seconds, 1)
    if ok:
        phase.p50_ms, phase.p95_ms, phase.p99_ms = (round(1000 * v, 1) for v in np.percentile(ok, [50, 95, 99]))
    if rejected:
        latencies = [latency for latency, _ in rejected]
        phase.rejected_p50_ms, phase.rejected_p99_ms = (round(1000 * v, 1) for v in np.percentile(latencies, [50, 99]))
        phase.rejected_with_retry_after = sum(retry for _, retry in rejected)
    return phase


async def send(session, url: str, image: bytes) -> tuple[str, bool]:
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", image, filename="image.jpg", content_type="image/jpeg")
    try:
        async with session.post(url, data=form) as response:
            await response.read()
            return str(response.status), "Retry-After" in response.headers
    except asyncio.TimeoutError:
        return "timeout", False
    except aiohttp.ClientError:
        return "connection_error", False


def client_session():
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),  # no client-side cap: concurrency is set by the workers
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


async def closed_loop(
    server: str, url: str, images: list[bytes], concurrency: int, duration: float, warmup: float
) -> Phase:
    """`concurrency` workers, each sending its next request when the last is answered, for warmup + duration s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start, window_end = start + warmup, start + warmup + duration
    samples: list = []

    async def worker(offset: int) -> None:
        index = offset
        while loop.time() < window_end:
            sent = loop.time()
            status, retry = await send(session, url, images[index % len(images)])
            answered = loop.time()
            # Throughput = answers completed inside the window, wherever the request started (a full pipeline).
            if window_start <= answered <= window_end:
                samples.append((answered - sent, status, retry))
            index += concurrency

    async with client_session() as session:
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        # Bounded: workers stop sending at window_end; stragglers are cancelled after the client timeout.
        _, pending = await asyncio.wait(tasks, timeout=warmup + duration + REQUEST_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return summarise(server, "closed", concurrency, duration, samples)


async def open_loop(
    server: str,
    url: str,
    images: list[bytes],
    rate: float,
    duration: float,
    warmup: float,
    max_in_flight: int = 1024,
) -> Phase:
    """Requests sent at a fixed rate whatever the answers; latency counted from the scheduled send time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start = start + warmup
    samples: list = []
    in_flight: set[asyncio.Task] = set()
    skipped = 0

    async def one(scheduled: float, image: bytes) -> None:
        status, retry = await send(session, url, image)
        answered = loop.time()
        # Every request scheduled in the window counts, however late its answer (no coordinated omission).
        if window_start <= scheduled:
            samples.append((answered - scheduled, status, retry))

    async with client_session() as session:
        for k in range(int(rate * (warmup + duration))):
            scheduled = start + k / rate
            await asyncio.sleep(max(0.0, scheduled - loop.time()))
            if len(in_flight) >= max_in_flight:
                skipped += scheduled >= window_start
                continue
            task = asyncio.create_task(one(scheduled, images[k % len(images)]))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            _, pending = await asyncio.wait(set(in_flight), timeout=REQUEST_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    phase = summarise(server, "open", max_in_flight, duration, samples)
    phase.target_rate = round(rate, 1)
    if skipped:
        phase.statuses["client_backlog_skipped"] = skipped
    return phase


def write_image_files(images: list[bytes], folder: Path) -> Path:
    """The images as files in `folder` for wrk, and the list of their paths (returned)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.jpg"
        path.write_bytes(image)
        paths.append(str(path))
    listing = folder / "images.txt"
    listing.write_text("\n".join(paths) + "\n")
    return listing


def wrk_closed_loop(server: str, url: str, listing: Path, concurrency: int, duration: float, warmup: float) -> Phase:
    """closed_loop's measurement made by wrk (C, one thread): `concurrency` connections, each sending its next
    request when the last is answered. It costs a fraction of the Python client's CPU, which shares the cores
    with the server under test. Warm-up is a separate wrk run whose figures are dropped."""

    def run_wrk(seconds: float) -> dict:
        command = [
            "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={REQUEST_TIMEOUT_S:g}s",
            "-s", str(WRK_SCRIPT), url, "--", str(listing),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    if warmup > 0:
        run_wrk(warmup)
    figures = run_wrk(duration)
    seconds = figures["duration_us"] / 1e6
    failed = figures["status"]  # answers with a status of 400 or more
    errors = {
        "timeout": figures["timeout"],
        "connection_error": figures["connect"] + figures["read"] + figures["write"],
    }
    ok = figures["requests"] - failed
    phase = Phase(server, "closed", concurrency, round(seconds, 2), figures["requests"], ok)
    phase.statuses = {"2xx": ok, **({"4xx/5xx": failed} if failed else {}), **{k: v for k, v in errors.items() if v}}
    phase.requests_per_second = round(ok / seconds, 1)
    # wrk's percentiles cover every answer; with no failed answers they are those of the OK ones.
    phase.p50_ms, phase.p95_ms, phase.p99_ms = (round(figures[f"p{p}_us"] / 1000, 1) for p in (50, 95, 99))
    return phase


def sweep(
    server: BentoServer,
    images: list[bytes],
    listing: Path | None,
    concurrencies: list[int],
    duration: float,
    warmup: float,
) -> list[Phase]:
    """Closed-loop phases at each concurrency; by wrk when `listing` (its image list) is given, else in Python."""
    phases = []
    url = f"{server.url}/classify"
    for concurrency in concurrencies:
        if listing is not None:
            phase = wrk_closed_loop(server.name, url, listing, concurrency, duration, warmup)
        else:
            phase = asyncio.run(closed_loop(server.name, url, images, concurrency, duration, warmup))
        print(
            f"[{server.name}] c={concurrency:4d}: {phase.requests_per_second:7.1f} req/s  p50 {phase.p50_ms} ms  "
            f"p99 {phase.p99_ms} ms  statuses {phase.statuses}",
            flush=True,
        )
        phases.append(phase)
    return phases


# ---- the run ---------------------------------------------------------------------------------------------------


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


def best_phase(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.requests_per_second)


def best_rate(phases: list[Phase]) -> float:
    return best_phase(phases).requests_per_second


def resnet_name(model_instances: int) -> str:
    """Server names: "resnet18" with one model instance, "resnet18-2i" with two."""
    return "resnet18" if model_instances == 1 else f"resnet18-{model_instances}i"


def resnet_comparison(model_instances: int) -> str:
    """The key of a ResNet-18 server's rounds against the raw engine."""
    return f"{resnet_name(model_instances).replace('-', '_')}_vs_raw_engine"


def worker_suffix(workers: int) -> str:
    """Server names: "noop" and "small-cnn" with one worker, "noop-2w" and "small-cnn-2w" with two."""
    return "" if workers == 1 else f"-{workers}w"


def run(args: argparse.Namespace) -> dict:
    from benchmarks.raw_engine import best, engine_predictor, measure_engine

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    small_workers = [int(w) for w in args.small_workers.split(",")]
    resnet_instances = [int(n) for n in args.resnet_instances.split(",")]
    # Fewer images in the export's accuracy check: these packages only carry load.
    small_package = (
        args.small_package
        or random_package(CACHE, args.small_arch, CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0]
    )
    if args.resnet_package:
        resnet_package, resnet_run = args.resnet_package, args.resnet_run
    else:
        resnet_package, resnet_run = random_package(
            CACHE, "resnet18", CIFAR10_CLASSES, args.data, "--eval-limit", "500"
        )
    images = read_test_jpegs(args.data, args.images)
    print(f"{len(images)} CIFAR-10 test JPEGs loaded from {args.data}", flush=True)
    listing = write_image_files(images, CACHE / "wrk-images") if args.client == "wrk" else None
    results: dict = {
        "command": " ".join(["python -m benchmarks.load_test", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "concurrency": concurrencies,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "images": len(images),
            "client": args.client,
            "small_workers": small_workers,
            "resnet_instances": resnet_instances,
            "rounds": args.rounds,
            "overload_queue": args.overload_queue,
            "overload_concurrency": args.overload_concurrency,
        },  # fmt: skip
        "packages": {
            "small": describe_package(small_package),
            "resnet": describe_package(resnet_package),
        },
        "ready_seconds": {},
        "phases": [],
    }

    # The raw engine at every batch size with no server running, right before and right after the ResNet's servers
    # (reported), as one call with every core's thread and as two calls side by side with one each (how
    # VISIONSERVE_MODEL_INSTANCES=2 runs it); the best batch size of each before them is what the rounds measure.
    engine_pixels = decode_all(images[:512], tuple(describe_spec(resnet_package)["input_size"]))
    engine_runs: list[dict[int, list]] = []

    def measure_raw_engine() -> None:
        runs = {}
        for calls in ENGINE_CALLS:
            predictor = engine_predictor(resnet_package, calls)
            runs[calls] = measure_engine(predictor, engine_pixels, seconds=args.engine_seconds, calls=calls)
        engine_runs.append(runs)
        figures = {
            str(calls): [{"batch_size": r.batch_size, "images_per_second": round(r.images_per_second, 1)} for r in run]
            for calls, run in runs.items()
        }
        results["raw_engine"].append(figures)
        print(f"[raw-engine] {figures}", flush=True)

    results["raw_engine"] = []

    def model_env(package: Path, **extra: str) -> dict[str, str]:
        return {"VISIONSERVE_MODEL": str(package), "VISIONSERVE_DEVICE": "cpu", **extra}

    def closed(server: BentoServer, concurrency: int) -> Phase:
        return sweep(server, images, listing, [concurrency], args.duration, args.warmup)[0]

    def record_and_sweep(server: BentoServer) -> None:
        results["ready_seconds"][server.name] = round(server.ready_seconds, 2)
        sweeps[server.name] = sweep(server, images, listing, concurrencies, args.duration, args.warmup)

    # Paired rounds after the sweeps: the two sides of each comparison alternate phase by phase at their best
    # concurrency (or batch size), so both see the same load on this shared machine; the median ratio counts.
    rounds: dict[str, list[dict]] = {}
    sweeps: dict[str, list[Phase]] = {}
    for workers in small_workers:
        env = {"VISIONSERVE_WORKERS": str(workers)}
        suffix = worker_suffix(workers)
        noop_name, noop_tuned_name, small_name = f"noop{suffix}", f"noop-tuned{suffix}", f"small-cnn{suffix}"
        # The no-op as BentoML runs it (the floor), and with the service's settings of the framework
        # (service/bentoml_config.py, service/gc_settings.py), which raise the framework's own floor too.
        with (
            BentoServer(NOOP_SERVICE, env, LOGS, noop_name) as noop,
            BentoServer(NOOP_SERVICE, {**env, NOOP_SERVICE_SETTINGS: "1"}, LOGS, noop_tuned_name) as noop_tuned,
            BentoServer(SERVICE, model_env(small_package, **env), LOGS, small_name) as small,
        ):
            for server in (noop, noop_tuned, small):
                record_and_sweep(server)
            best_c = {name: best_phase(sweeps[name]).concurrency for name in (noop_name, noop_tuned_name, small_name)}
            pairs, pairs_tuned = [], []
            for _ in range(args.rounds):
                floor = closed(noop, best_c[noop_name]).requests_per_second
                floor_tuned = closed(noop_tuned, best_c[noop_tuned_name]).requests_per_second
                real = closed(small, best_c[small_name]).requests_per_second
                pairs.append({"noop_rps": floor, "small_rps": real, "ratio": round(real / floor, 3)})
                pairs_tuned.append({"noop_rps": floor_tuned, "small_rps": real, "ratio": round(real / floor_tuned, 3)})
                print(f"[{small_name}] {real} req/s = {real / floor:.1%} of {noop_name}, {real / floor_tuned:.1%} of "
                      f"{noop_tuned_name}", flush=True)  # fmt: skip
            rounds[f"small_cnn_vs_noop{suffix}"] = pairs
            rounds[f"small_cnn_vs_noop_tuned{suffix}"] = pairs_tuned

    measure_raw_engine()
    resnet_names = {n: resnet_name(n) for n in resnet_instances}
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                BentoServer(SERVICE, model_env(resnet_package, VISIONSERVE_MODEL_INSTANCES=str(n)), LOGS, name)
            )
            for n, name in resnet_names.items()
        ]
        for server in servers:
            record_and_sweep(server)
        best_c = {server.name: best_phase(sweeps[server.name]).concurrency for server in servers}
        engines = {  # in this process; the servers idle meanwhile
            calls: (engine_predictor(resnet_package, calls), best(engine_runs[0][calls]).batch_size)
            for calls in ENGINE_CALLS
        }
        pairs: dict[str, list] = {server.name: [] for server in servers}
        for _ in range(args.rounds):
            limits = {
                calls: measure_engine(predictor, engine_pixels, (batch,), args.engine_seconds, calls)[0]
                for calls, (predictor, batch) in engines.items()
            }
            limit = max(result.images_per_second for result in limits.values())  # the machine's limit this round
            for server in servers:
                served = closed(server, best_c[server.name]).requests_per_second
                pairs[server.name].append({
                    "engine_ips": {str(calls): round(r.images_per_second, 1) for calls, r in limits.items()},
                    "service_rps": served,
                    "ratio": round(served / limit, 3),
                })  # fmt: skip
                print(f"[{server.name} vs raw engine] {served} / {limit:.1f} = {served / limit:.1%}", flush=True)
        for n, name in resnet_names.items():
            rounds[resnet_comparison(n)] = pairs[name]
        del engines
        for server in servers:
            rate = 0.8 * best_rate(sweeps[server.name])
            phase = asyncio.run(
                open_loop(server.name, f"{server.url}/classify", images, rate, args.duration, args.warmup)
            )
            print(f"[{server.name}] open loop at {rate:.0f} req/s: statuses {phase.statuses} p99 {phase.p99_ms} ms")
            sweeps[server.name].append(phase)
    measure_raw_engine()
    if resnet_run:
        with BentoServer(NAIVE_SERVICE, {"VISIONSERVE_NAIVE_RUN": str(resnet_run)}, LOGS, "resnet18-naive") as server:
            record_and_sweep(server)
    for phases in sweeps.values():
        results["phases"].extend(asdict(p) for p in phases)
    results["rounds"] = rounds

    # Overload: a small queue, far more clients than it holds, then light load again.
    name = "resnet18-overload"
    queue = str(args.overload_queue)  # a request may hold no more images than the queue
    env = model_env(resnet_package, VISIONSERVE_MAX_QUEUE=queue, VISIONSERVE_MAX_BATCH_IMAGES=queue)
    with BentoServer(SERVICE, env, LOGS, name) as server:
        results["ready_seconds"][name] = round(server.ready_seconds, 2)
        url = f"{server.url}/classify"
        overload = []
        for label, concurrency in (
            ("before", 1),
            ("overload", args.overload_concurrency),
            ("after", 1),
        ):
            phase = asyncio.run(closed_loop(f"{name}:{label}", url, images, concurrency, args.duration, args.warmup))
            print(
                f"[{name}:{label}] c={concurrency}: {phase.requests_per_second} req/s p99 {phase.p99_ms} ms "
                f"rejected p99 {phase.rejected_p99_ms} ms statuses {phase.statuses}",
                flush=True,
            )
            overload.append(phase)
        results["phases"].extend(asdict(p) for p in overload)

    results["comparisons"] = {name: statistics.median(p["ratio"] for p in pairs) for name, pairs in rounds.items()}
    results["comparisons"]["raw_engine_best_batch"] = {
        str(calls): best(run).batch_size for calls, run in engine_runs[0].items()
    }
    if "resnet18-naive" in sweeps:
        resnet = max(best_rate(sweeps[name][:-1]) for name in resnet_names.values())  # [:-1]: not the open loop
        results["comparisons"]["resnet18_vs_naive"] = round(resnet / best_rate(sweeps["resnet18-naive"]), 2)
    results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return results


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


def round_ratios(pairs: list[dict]) -> str:
    return ", ".join(f"{p['ratio']:.0%}" for p in pairs)


def markdown(results: dict) -> str:
    m, s, c, r = results["machine"], results["settings"], results["comparisons"], results["rounds"]
    engine_batches = ", ".join(
        f"{batch} for {calls} call{'s' * (calls != '1')}" for calls, batch in c["raw_engine_best_batch"].items()
    )
    lines = [
        "# Service load benchmark",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Machine: {m['nproc']} CPU cores ({m['cpu_model']}), no GPU; Python {m['python']}. The load generator "
        "runs on the same cores as the server (shared machine: compare ratios within this run). Load average "
        f"(1/5/15 min) {m['load_average_at_start']} at the start, {m['load_average_at_end']} at the end.",
        f"- Load: closed-loop workers at concurrency {s['concurrency']}, {s['duration_s']} s measured after "
        f"{s['warmup_s']} s of warm-up per phase; single-image multipart uploads drawn from {s['images']} "
        f"CIFAR-10 test JPEGs (32x32, q75). Closed-loop client: {CLIENTS[s['client']]}; the open-loop and "
        "overload phases use the Python client (it records each answer's status and Retry-After).",
    ]
    for role, p in results["packages"].items():
        accuracy = f", training test accuracy {p['training_test_accuracy']:.4f}" if p["training_test_accuracy"] else ""
        lines.append(
            f"- {role} package: {p['name']} {p['version']} ({p['arch']}, {p['weights']} weights{accuracy}), `{p['path']}`"
        )
    lines += [
        "",
        "## Comparisons",
        "",
        f"Paired rounds: after the sweeps, the two sides of each comparison alternate {s['rounds']} times, phase by "
        "phase, at their best concurrency (the ResNet-18's raw engine at its best batch size, in this process while "
        "the server idles); the median of the rounds' ratios, with the rounds in brackets.",
        "",
        *(
            f"- small CNN /classify vs the no-op endpoint, {w} worker{'s' * (w > 1)} each: "
            f"**{c['small_cnn_vs_noop' + worker_suffix(w)]:.1%}** ({round_ratios(r['small_cnn_vs_noop' + worker_suffix(w)])}; "
            "target >= 90%)"
            for w in s["small_workers"]
        ),
        *(
            f"- the same against the no-op run with the service's framework settings (service/bentoml_config.py, "
            f"service/gc_settings.py), {w} worker{'s' * (w > 1)} each: "
            f"**{c['small_cnn_vs_noop_tuned' + worker_suffix(w)]:.1%}** "
            f"({round_ratios(r['small_cnn_vs_noop_tuned' + worker_suffix(w)])})"
            for w in s["small_workers"]
        ),
        *(
            f"- ResNet-18 /classify with {n} model instance{'s' * (n > 1)} (`VISIONSERVE_MODEL_INSTANCES={n}`) vs the "
            "raw ONNX Runtime session, the faster of one call and two side by side at their best batch sizes "
            f"({engine_batches}): **{c[resnet_comparison(n)]:.1%}** of its images/s "
            f"({round_ratios(r[resnet_comparison(n)])}; target >= 80%)"
            for n in s["resnet_instances"]
        ),
    ]
    if "resnet18_vs_naive" in c:
        lines.append(
            f"- ResNet-18 /classify vs the naive eager-PyTorch service (no batching): **{c['resnet18_vs_naive']}x**"
        )
    lines += [
        "",
        "## Time from process start to /readyz = 200",
        "",
        "| server | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds} |" for name, seconds in results["ready_seconds"].items()]
    before, after = results["raw_engine"]
    calls = list(before)
    lines += [
        "",
        "## Raw ONNX Runtime session (ResNet-18, in-process, no HTTP, no decoding)",
        "",
        "Measured right before and right after the ResNet-18 servers ran, as one call with a thread per core and as two "
        "calls side by side with half the threads each; the paired rounds use each one's best batch size before.",
        "",
        "| batch | " + " | ".join(f"{n} call{'s' * (n != '1')}: images/s before | after" for n in calls) + " |",
        "|---:|" + "---:|---:|" * len(calls),
    ]
    for row, batch in enumerate(before[calls[0]]):
        cells = [f"{before[n][row]['images_per_second']} | {after[n][row]['images_per_second']}" for n in calls]
        lines.append(f"| {batch['batch_size']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Phases",
        "",
        "Latencies of OK answers in ms; `open` = fixed arrival rate (80% of the best closed-loop rate), latency from the "
        "scheduled send time. Rejected = 503/429 answers (their latency, and how many carried Retry-After).",
        "",
        "| server | kind | c | req/s (OK) | p50 | p95 | p99 | statuses | rejected p50/p99 | with Retry-After |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for p in results["phases"]:
        kind = p["kind"] if p["target_rate"] is None else f"open @ {p['target_rate']}/s"
        rejected = f"{p['rejected_p50_ms']} / {p['rejected_p99_ms']}" if p["rejected_p50_ms"] is not None else ""
        statuses = ", ".join(f"{k}: {v}" for k, v in p["statuses"].items())
        lines.append(
            f"| {p['server']} | {kind} | {p['concurrency']} | {p['requests_per_second']} | {p['p50_ms']} | "
            f"{p['p95_ms']} | {p['p99_ms']} | {statuses} | {rejected} | {p['rejected_with_retry_after']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-package", type=Path, help="package of the small CNN (default: random weights)")
    parser.add_argument(
        "--small-arch",
        default="cnn_bn",
        help="registry name of the small CNN built when no package is given",
    )
    parser.add_argument(
        "--resnet-package",
        type=Path,
        help="package of the CIFAR ResNet-18 (default: random weights)",
    )
    parser.add_argument(
        "--resnet-run",
        type=Path,
        help="training run of --resnet-package, for the naive eager baseline",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_ARCHIVE,
        help="CIFAR-10 JPEG archive (test/ members are sent)",
    )
    parser.add_argument("--images", type=int, default=2000, help="distinct test JPEGs to cycle through")
    parser.add_argument("--concurrency", default="1,8,32,128", help="comma-separated closed-loop concurrencies")
    parser.add_argument(
        "--small-workers",
        default="1,2",
        help="comma-separated worker counts (VISIONSERVE_WORKERS) for the no-op and small-CNN servers",
    )
    parser.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="wrk" if shutil.which("wrk") else "python",
        help="closed-loop load generator (default: wrk when installed: apt-get install wrk)",
    )
    parser.add_argument(
        "--resnet-instances",
        default="1,2",
        help="comma-separated VISIONSERVE_MODEL_INSTANCES values, one ResNet-18 server each",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per comparison; the median ratio counts")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase's window")
    parser.add_argument("--engine-seconds", type=float, default=3.0, help="raw engine measuring time per batch size")
    parser.add_argument(
        "--overload-queue",
        type=int,
        default=32,
        help="VISIONSERVE_MAX_QUEUE of the overload server",
    )
    parser.add_argument("--overload-concurrency", type=int, default=256, help="clients in the overload phase")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "service_load.md",
        help="results markdown (JSON beside it)",
    )
    args = parser.parse_args(argv)
    if args.resnet_package and not args.resnet_run:
        print("note: no --resnet-run given: the naive eager baseline is skipped", file=sys.stderr)
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
