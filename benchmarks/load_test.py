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
import contextlib
import os
import shutil
import statistics
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import (
    CACHE,
    CIFAR10_CLASSES,
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
from benchmarks.loadgen import CLIENTS, Phase, best_phase, best_rate, closed_loop, open_loop, sweep, write_image_files
from benchmarks.random_weights import random_package
from benchmarks.raw_engine import ENGINE_CALLS, best, engine_predictor, measure_engine
from benchmarks.servers import NOOP_SERVICE, NOOP_SERVICE_SETTINGS, SERVICE, BentoServer

NAIVE_SERVICE = "benchmarks.naive_service:NaiveClassifier"


# ---- the run ---------------------------------------------------------------------------------------------------


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
