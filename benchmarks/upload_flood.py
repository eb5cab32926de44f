"""A flood of large uploads: many clients each sending a 15 MB body at once, while a few clients send normal small
requests; the server's memory, what the large uploads got, and whether the small requests were still served.

    python -m benchmarks.upload_flood --package packages/quick [--clients 200] [--megabytes 15] [--seconds 20]

Results: benchmarks/results/upload_flood.md and .json beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.common import DEFAULT_ARCHIVE, LOGS, RESULTS, machine, read_test_jpegs, run_and_report
from benchmarks.servers import SERVICE, BentoServer, peak_memory

SMALL_CLIENTS = 4


async def flood(url: str, images: list[bytes], clients: int, body: bytes, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    large: collections.Counter = collections.Counter()
    retry_after = 0
    small: list[tuple[str, float]] = []
    small_errors: list[dict] = []  # when and how a small request failed: what the figures alone cannot say

    async def uploader() -> None:
        nonlocal retry_after
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            while loop.time() < end:
                try:
                    async with session.post(f"{url}/classify", data=body, headers={"content-type": "image/jpeg"}) as r:
                        answer = await r.json(content_type=None)
                        large[f"{r.status} {answer.get('code')}"] += 1
                        retry_after += "Retry-After" in r.headers
                        if r.status == 503:
                            await asyncio.sleep(float(r.headers.get("Retry-After", 1)))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    large[type(exc).__name__] += 1

    async def normal(offset: int) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            index = offset
            while loop.time() < end:
                form = aiohttp.FormData()
                form.add_field("image", images[index % len(images)], filename="a.jpg", content_type="image/jpeg")
                sent = loop.time()
                try:
                    async with session.post(f"{url}/classify", data=form) as r:
                        await r.read()
                        small.append((str(r.status), loop.time() - sent))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    small.append((type(exc).__name__, loop.time() - sent))
                    at_s = round(sent - (end - seconds), 2)
                    small_errors.append({"client": offset, "sent_at_s": at_s, "error": f"{type(exc).__name__}: {exc}"})
                index += SMALL_CLIENTS

    await asyncio.gather(*(uploader() for _ in range(clients)), *(normal(i) for i in range(SMALL_CLIENTS)))
    ok = [latency for status, latency in small if status == "200"]
    return {
        "large_outcomes": dict(sorted(large.items())),
        "large_503_with_retry_after": retry_after,
        "small_requests": len(small),
        "small_ok": len(ok),
        "small_statuses": dict(collections.Counter(status for status, _ in small)),
        "small_errors": small_errors,
        "small_p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
        "small_p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None,
    }


def flood_server(args: argparse.Namespace, images: list[bytes], body: bytes, extra_env: dict[str, str]) -> dict:
    env = {"VISIONSERVE_MODEL": str(args.package.resolve()), **extra_env}
    with BentoServer(SERVICE, env, log_dir=LOGS, name="upload-flood") as server:
        with peak_memory(server.process.pid) as peaks:
            time.sleep(0.5)
            started = time.perf_counter()
            outcome = asyncio.run(flood(server.url, images, args.clients, body, args.seconds))
            elapsed = time.perf_counter() - started
        alive = server.process.poll() is None
    return {
        "seconds": round(elapsed, 1),
        "server_rss_before_mb": round(peaks.get("before", 0) / 2**20),
        "server_rss_peak_mb": round(peaks.get("peak", 0) / 2**20),
        "server_alive_after": alive,
        **outcome,
    }


def run(args: argparse.Namespace) -> dict:
    images = read_test_jpegs(args.archive, 64)
    body = np.random.default_rng(0).bytes(int(args.megabytes * 2**20))
    runs = {"service defaults": flood_server(args, images, body, {})}
    if args.compare_without_budget:
        # A budget no flood reaches: what the same flood does when only the body-size limit applies.
        unlimited = {"VISIONSERVE_MAX_UPLOAD_BYTES_IN_FLIGHT": str(2**40)}
        runs["upload budget off"] = flood_server(args, images, body, unlimited)
    return {
        "command": "python -m benchmarks.upload_flood " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "clients": args.clients,
        "megabytes": args.megabytes,
        "planned_seconds": args.seconds,
        "runs": runs,
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# A flood of large uploads",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}",
        "",
        f"{r['clients']} clients each sending {r['megabytes']} MB bodies of random bytes to /classify in a loop for "
        f"{r['planned_seconds']} s (a 503 waits its Retry-After), beside {SMALL_CLIENTS} clients sending single CIFAR-10 "
        "test JPEGs. MAX_BODY_BYTES is 16 MiB (the default) in both runs; the service's default upload budget "
        "(MAX_UPLOAD_BYTES_IN_FLIGHT) is 128 MiB.",
        "",
        "| run | server memory (all its processes) before -> peak | large uploads' answers | 503 with Retry-After "
        "| small requests answered 200 | small p50 / p99 | server up after |",
        "|---|---|---|---:|---|---|---|",
    ]
    for name, run in r["runs"].items():
        lines.append(
            f"| {name} | {run['server_rss_before_mb']} -> {run['server_rss_peak_mb']} MB | {run['large_outcomes']} "
            f"| {run['large_503_with_retry_after']} | {run['small_ok']} of {run['small_requests']} "
            f"| {run['small_p50_ms']} / {run['small_p99_ms']} ms | {run['server_alive_after']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upload_flood", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package to serve")
    parser.add_argument("--clients", type=int, default=200, help="clients sending large bodies (default %(default)s)")
    parser.add_argument("--megabytes", type=float, default=15, help="size of each large body (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=20, help="flood duration (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument(
        "--compare-without-budget", action="store_true", help="a second run with the upload budget out of reach"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "upload_flood.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
