"""Where a /classify request's CPU goes inside a service worker, layer by layer, with no sockets.

    python -m benchmarks.request_cost [--package PKG] [--requests 20000] [--concurrency 32] [--rounds 5]
        [--variants bentoml routes ...]

Each variant runs in a fresh process that imports the service (one worker's settings: VISIONSERVE_WORKERS=1,
no gRPC), starts BentoML's app through its lifespan on uvloop (as `bentoml serve` does), and calls an ASGI app directly with one CIFAR-10 JPEG a
request, as a multipart upload like curl's, from `--concurrency` concurrent callers (so the model's batches fill
as under load). It reports the event loop thread's CPU per request (time.thread_time: routing, middleware,
parsing, decoding, batching, JSON) and the whole process's (the model's threads too). The variants, in turn each
round (medians of the rounds):
- `bentoml`: BentoML's app as `bentoml serve` builds it for this service (its middleware, then the routes);
- `bentoml-without-<Middleware>`: the same without one of BentoML's middlewares (left out of its app factory's
  list in that process only): what that layer costs;
- `routes`: the service's own Starlette app (service.app: routing, JSON errors), without BentoML's layers;
- `handler`: service.classify_routes.classify called directly: the request's own work.
What a real server adds on top (uvicorn's HTTP parsing, the sockets, the kernel) is what benchmarks/service_cpu.py
and the load tests see beyond `bentoml` here. The callers' own work (building each scope) is in every variant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

from benchmarks.common import CACHE, CIFAR10_CLASSES, DEFAULT_ARCHIVE, RESULTS, machine, read_test_jpegs, run_and_report

BOUNDARY = b"request-cost-boundary"
BENTOML_MIDDLEWARES = ("RunnerTrafficMetricsMiddleware", "OpenTelemetryMiddleware", "TimeoutMiddleware")
VARIANTS = ("bentoml", *(f"bentoml-without-{name}" for name in BENTOML_MIDDLEWARES), "routes", "handler")
WARM_UP_REQUESTS = 2000


def multipart_body(jpeg: bytes) -> bytes:
    return (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"; filename="image.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--" + BOUNDARY + b"--\r\n"
    )


# ---- one variant, in its own process ---------------------------------------------------------------------------


def leave_out_middleware(name: str) -> None:
    """Build BentoML's service apps in this process without the middleware class called `name`."""
    from _bentoml_impl.server.app import ServiceAppFactory

    every = ServiceAppFactory.middlewares.fget
    ServiceAppFactory.middlewares = property(lambda self: [m for m in every(self) if m.cls.__name__ != name])


async def lifespan_started(app) -> asyncio.Task:
    """Send the app its lifespan startup (the service's startup hook starts the batchers), then wait until /readyz
    answers 200 (the warm-up is over). The lifespan's task is returned: it must stay referenced while serving."""
    messages: asyncio.Queue = asyncio.Queue()
    answers: asyncio.Queue = asyncio.Queue()
    await messages.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.get_running_loop().create_task(app(scope, messages.get, answers.put))
    answer = await answers.get()
    if answer["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the service did not start: {answer}")
    for _ in range(600):
        if await call(app, b"", method="GET", path="/readyz") == 200:
            return lifespan
        await asyncio.sleep(0.1)
    raise RuntimeError("the service did not turn ready within 60 s")


def request_scope(body: bytes, method: str, path: str) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:3000"),
            (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 3000), "state": {},
    }  # fmt: skip


async def call(app, body: bytes, method: str = "POST", path: str = "/classify") -> int:
    """One request through `app`: its status."""
    delivered = False
    statuses = []

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client waits for its answer

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(request_scope(body, method, path), receive, send)
    return statuses[0]


async def measure_variant(variant: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    if variant.startswith("bentoml-without-"):
        leave_out_middleware(variant.removeprefix("bentoml-without-"))
    import service.service as service  # imported here: the environment and the factory patch come first

    app = service.ImageClassifier.to_asgi()
    lifespan = await lifespan_started(app)  # noqa: F841 - referenced while the requests run
    if variant == "routes":
        app = service.app
    elif variant == "handler":
        from starlette.requests import Request

        from service.classify_routes import classify

        async def app(scope, receive, send):  # noqa: F811 - the handler alone, as Starlette's route would call it
            response = await classify(Request({**scope, "app": service.app}, receive))
            await response(scope, receive, send)

    async def caller(index: int, count: int, statuses: list[int]) -> None:
        for i in range(count):
            statuses.append(await call(app, bodies[(index * 7 + i) % len(bodies)]))

    async def run(count: int) -> tuple[list[int], float, float, float]:
        statuses: list[int] = []
        wall, process, thread = time.perf_counter(), time.process_time(), time.thread_time()
        await asyncio.gather(*(caller(k, count // concurrency, statuses) for k in range(concurrency)))
        return statuses, time.perf_counter() - wall, time.process_time() - process, time.thread_time() - thread

    await run(WARM_UP_REQUESTS)
    statuses, wall, process, thread = await run(requests)
    if set(statuses) != {200}:
        raise RuntimeError(f"{variant}: answers other than 200: {sorted(set(statuses))}")
    return {
        "variant": variant,
        "requests": len(statuses),
        "requests_per_second": round(len(statuses) / wall, 1),
        "event_loop_us_per_request": round(1e6 * thread / len(statuses), 1),
        "process_us_per_request": round(1e6 * process / len(statuses), 1),
    }


def child_main(args: argparse.Namespace) -> int:
    """`--variant`: measure one variant in this process and print its figures as one JSON line."""
    bodies = [multipart_body(jpeg) for jpeg in read_test_jpegs(args.data, 64)]
    measurement = measure_variant(args.variant, bodies, args.requests, args.concurrency)
    try:
        import uvloop  # the event loop `bentoml serve` runs the service on, where it is installed
    except ImportError:
        figures = asyncio.run(measurement)
    else:
        figures = uvloop.run(measurement)
    print(json.dumps(figures))
    return 0


# ---- the rounds ------------------------------------------------------------------------------------------------


def measure_in_child(args: argparse.Namespace, package: Path, variant: str) -> dict:
    env = {
        **os.environ,
        "VISIONSERVE_MODEL": str(package),
        "VISIONSERVE_WORKERS": "1",  # one worker's share: its runtime threads and batcher, as one of several
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_GRPC_PORT": "0",
    }
    command = [
        sys.executable, "-m", "benchmarks.request_cost", "--variant", variant, "--data", str(args.data),
        "--requests", str(args.requests), "--concurrency", str(args.concurrency),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from benchmarks.common import describe_package
    from benchmarks.random_weights import random_package

    package = args.package or random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0]
    rounds = []
    variants = list(args.variants)
    for index in range(args.rounds):
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        figures = {}
        for variant in order:
            figures[variant] = measure_in_child(args, package, variant)
            print(f"round {index + 1} {variant}: {figures[variant]}", flush=True)
        rounds.append(figures)
    return {
        "command": " ".join(["python -m benchmarks.request_cost", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "package": describe_package(package),
        "settings": {"requests": args.requests, "concurrency": args.concurrency, "rounds": args.rounds},
        "rounds": rounds,
        "medians": medians(rounds),
    }


def medians(rounds: list[dict]) -> dict:
    """Per variant, the median over rounds of each figure; and per BentoML middleware, the median of each round's
    difference in event-loop CPU per request between the whole app and the app without it."""
    keys = ("requests_per_second", "event_loop_us_per_request", "process_us_per_request")
    result = {variant: {key: median(r[variant][key] for r in rounds) for key in keys} for variant in rounds[0]}
    result = {variant: result[variant] for variant in VARIANTS if variant in result}  # the report's order
    for name in BENTOML_MIDDLEWARES:
        without = f"bentoml-without-{name}"
        if without in rounds[0] and "bentoml" in rounds[0]:
            result[without]["event_loop_us_saved"] = round(
                median(
                    r["bentoml"]["event_loop_us_per_request"] - r[without]["event_loop_us_per_request"] for r in rounds
                ),
                1,
            )
    return result


def markdown(results: dict) -> str:
    settings, machine_info, package = results["settings"], results["machine"], results["package"]
    lines = [
        "# Where a /classify request's CPU goes inside a service worker",
        "",
        f"- Command: `{results['command']}`",
        f"- Date: {results['date']}",
        f"- Machine: {machine_info['nproc']} cores ({machine_info['cpu_model']}), Python {machine_info['python']}; "
        f"load average at the start {machine_info['load_average_at_start']} (shared machine).",
        f"- Package: {package['name']} {package['version']} ({package['arch']}, {package['weights']} weights).",
        f"- Each variant in a fresh process, one worker's settings, {settings['requests']} requests from "
        f"{settings['concurrency']} concurrent in-process callers after {WARM_UP_REQUESTS} of warm-up; the variants "
        f"take turns, {settings['rounds']} rounds, medians. See the docstring of `benchmarks/request_cost.py`.",
        "",
        "| variant | requests/s | event loop µs / request | process µs / request | loop µs saved vs bentoml |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, figures in results["medians"].items():
        saved = figures.get("event_loop_us_saved")
        lines.append(
            f"| {variant} | {figures['requests_per_second']:.0f} | {figures['event_loop_us_per_request']:.1f} | "
            f"{figures['process_us_per_request']:.1f} | {'' if saved is None else f'{saved:.1f}'} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="model package (default: a random-weight lesson CNN)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (test JPEGs)")
    parser.add_argument("--requests", type=int, default=20000, help="measured requests per variant and round")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent in-process callers")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="default: all")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--out", type=Path, default=RESULTS / "request_cost.md", help="markdown (JSON beside)")
    args = parser.parse_args(argv)
    if args.variant:
        return child_main(args)
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    sys.exit(main())
