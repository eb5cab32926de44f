"""Clients that hold back their request heads, against the service with its request-head limits (the default) and
without them (VISIONSERVE_REQUEST_HEAD_TIMEOUT_S=0, uvicorn's behaviour): what the server still holds at the end,
its memory, and whether normal requests are served meanwhile.

    python -m benchmarks.request_heads --package packages/quick [--connections 1000] [--seconds 30]

During `--seconds`: half of `--connections` connect and send nothing (a client that vanished, or a preconnect);
the other half send a request line and then one header line every 5 s (slowloris); one connection sends header
lines as fast as the server takes them (up to 1 GiB); 4 clients send single CIFAR-10 test JPEGs to /classify in a loop. No
attacking connection reconnects, so what is still open at the end is what the server holds.

Results: benchmarks/results/request_heads.md and .json beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np

from benchmarks.common import DEFAULT_ARCHIVE, LOGS, RESULTS, machine, provenance, read_test_jpegs, run_and_report
from benchmarks.servers import SERVICE, BentoServer, peak_memory

NORMAL_CLIENTS = 4
SLOWLORIS_PERIOD_S = 5.0
ENDLESS_LINE = b"X-Filler: " + b"a" * 1000 + b"\r\n"
ENDLESS_CAP_BYTES = 2**30  # the endless head stops sending here, so that a server without limits keeps some memory


async def held_open(reader: asyncio.StreamReader) -> float | None:
    """Reads until the server closes the connection; the time that took, None if it never did (cancelled)."""
    opened = time.monotonic()
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return time.monotonic() - opened


async def silent(host: str, port: int, closed: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        closed.append(await held_open(reader))
    finally:
        writer.close()


async def slowloris(host: str, port: int, closed: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    watch = asyncio.create_task(held_open(reader))
    try:
        writer.write(b"GET /classify HTTP/1.1\r\nHost: benchmark\r\n")
        while not watch.done():
            await asyncio.wait([watch], timeout=SLOWLORIS_PERIOD_S)
            if not watch.done():
                writer.write(b"X-Slow: 1\r\n")
        closed.append(watch.result())
    except ConnectionError:
        closed.append(await watch)
    finally:
        watch.cancel()
        writer.close()


async def endless_head(host: str, port: int, outcome: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    outcome["bytes_sent"] = 0  # into the sockets' buffers too: a few MB more than the server read
    try:
        writer.write(b"GET /classify HTTP/1.1\r\nHost: benchmark\r\n")
        while outcome["bytes_sent"] < ENDLESS_CAP_BYTES:
            writer.write(ENDLESS_LINE * 64)
            await writer.drain()
            outcome["bytes_sent"] += len(ENDLESS_LINE) * 64
        await held_open(reader)
    except ConnectionError as exc:
        outcome["ended_by"] = type(exc).__name__
        outcome["answer"] = (await reader.read(4096)).split(b"\r\n", 1)[0].decode(errors="replace")
    finally:
        writer.close()


async def normal_client(url: str, images: list[bytes], offset: int, end: float, results: list) -> None:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        index = offset
        while loop.time() < end:
            form = aiohttp.FormData()
            form.add_field("image", images[index % len(images)], filename="a.jpg", content_type="image/jpeg")
            sent = loop.time()
            try:
                async with session.post(f"{url}/classify", data=form) as response:
                    await response.read()
                    results.append((str(response.status), loop.time() - sent))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                results.append((type(exc).__name__, loop.time() - sent))
            index += NORMAL_CLIENTS


async def attack(url: str, images: list[bytes], connections: int, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    silent_closed: list[float] = []
    slow_closed: list[float] = []
    endless: dict = {}
    normal: list[tuple[str, float]] = []
    end = loop.time() + seconds
    attackers = [asyncio.create_task(silent(host, int(port), silent_closed)) for _ in range(connections // 2)]
    attackers += [asyncio.create_task(slowloris(host, int(port), slow_closed)) for _ in range(connections // 2)]
    attackers.append(asyncio.create_task(endless_head(host, int(port), endless)))
    await asyncio.gather(*(normal_client(url, images, i, end, normal) for i in range(NORMAL_CLIENTS)))
    await asyncio.sleep(max(0.0, end - loop.time()))
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    ok = [latency for status, latency in normal if status == "200"]
    return {
        "silent_closed_by_server": len(silent_closed),
        "silent_closed_after_s_median": round(float(np.median(silent_closed)), 1) if silent_closed else None,
        "slowloris_closed_by_server": len(slow_closed),
        "slowloris_closed_after_s_median": round(float(np.median(slow_closed)), 1) if slow_closed else None,
        "endless_head_bytes_accepted": endless.get("bytes_sent", 0),
        "endless_head_ended_by": endless.get("ended_by", "still open at the end"),
        "endless_head_answer": endless.get("answer"),
        "normal_requests": len(normal),
        "normal_ok": len(ok),
        "normal_p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
        "normal_p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None,
    }


def attack_server(args: argparse.Namespace, images: list[bytes], extra_env: dict[str, str]) -> dict:
    env = {"VISIONSERVE_MODEL": str(args.package.resolve()), **extra_env}
    with BentoServer(SERVICE, env, log_dir=LOGS, name="request-heads") as server:
        with peak_memory(server.process.pid) as peaks:
            time.sleep(0.5)
            outcome = asyncio.run(attack(server.url, images, args.connections, args.seconds))
        alive = server.process.poll() is None
    return {
        "server_rss_before_mb": round(peaks.get("before", 0) / 2**20),
        "server_rss_peak_mb": round(peaks.get("peak", 0) / 2**20),
        "server_alive_after": alive,
        **outcome,
    }


def run(args: argparse.Namespace) -> dict:
    images = read_test_jpegs(args.archive, 64)
    return {
        "command": "python -m benchmarks.request_heads " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "connections": args.connections,
        "seconds": args.seconds,
        "runs": {
            "limits on (default, 10 s)": attack_server(args, images, {}),
            "limits off (VISIONSERVE_REQUEST_HEAD_TIMEOUT_S=0)": attack_server(
                args, images, {"VISIONSERVE_REQUEST_HEAD_TIMEOUT_S": "0"}
            ),
        },
    }


def closed(count: int, of: int, median_s: float | None) -> str:
    return f"{count} of {of}" + (f" ({median_s} s)" if median_s is not None else "")


def markdown(r: dict) -> str:
    half = r["connections"] // 2
    lines = [
        "# Clients that hold back their request heads",
        "",
        provenance(r),
        "",
        f"For {r['seconds']} s: {half} connections that send nothing, {half} that send a request line and then one "
        f"header line every {SLOWLORIS_PERIOD_S:g} s (slowloris), one that sends header lines as fast as the server "
        f"takes them (up to {ENDLESS_CAP_BYTES / 2**30:g} GiB), and {NORMAL_CLIENTS} clients sending single CIFAR-10 "
        "test JPEGs to /classify in a loop. No "
        "attacking connection reconnects: what the server has not closed by the end, it holds.",
        "",
        "| run | silent connections closed by the server (median after) | slowloris closed (median after) "
        "| endless head: bytes sent until the server ended it | server memory (all its processes) before -> peak "
        "| normal requests answered 200 | normal p50 / p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        lines.append(
            f"| {name} | {closed(run['silent_closed_by_server'], half, run['silent_closed_after_s_median'])} "
            f"| {closed(run['slowloris_closed_by_server'], half, run['slowloris_closed_after_s_median'])} "
            f"| {run['endless_head_bytes_accepted'] / 2**20:,.1f} MiB, {run['endless_head_ended_by']}"
            f"{' (' + run['endless_head_answer'] + ')' if run['endless_head_answer'] else ''} "
            f"| {run['server_rss_before_mb']} -> {run['server_rss_peak_mb']} MB "
            f"| {run['normal_ok']} of {run['normal_requests']} | {run['normal_p50_ms']} / {run['normal_p99_ms']} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.request_heads", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package to serve")
    parser.add_argument("--connections", type=int, default=1000, help="attacking connections (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=30, help="attack duration (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "request_heads.md", help="markdown report (JSON beside)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
