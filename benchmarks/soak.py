"""Soak test: a long open-loop run at a fraction of the service's saturation with a mix of routes and bad inputs;
unexpected errors, the workers' memory over time, and p99 latency at the start against the end.

    python -m benchmarks.soak --package packages/quick [--minutes 30] [--load 0.7]

Saturation is measured first (closed loop, the best of a few concurrencies); then requests arrive at `--load` times
that rate: single images on /classify (multipart, 80%), /classify_batch with 4 images (10%), v2 infer with an
encoded image (9%) and a bad input (1%: bytes that are no image, which must get a 4xx JSON). Unexpected = a good
request that did not get 200, or a bad one that did not get a 4xx. Results: benchmarks/results/soak.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import DEFAULT_ARCHIVE, LOGS, RESULTS, machine, read_test_jpegs, run_and_report
from benchmarks.loadgen import REQUEST_TIMEOUT_S, client_session, closed_loop
from benchmarks.servers import SERVICE, BentoServer

MIX = (("classify", 0.80), ("classify_batch", 0.10), ("v2_infer", 0.09), ("bad", 0.01))
WINDOW_S = 300  # p99 compared between the first and the last window
RSS_EVERY_S = 10


async def send(session, base: str, kind: str, images: list[bytes], rng: random.Random, model: str) -> str:
    import aiohttp

    image = images[rng.randrange(len(images))]
    if kind == "classify":
        form = aiohttp.FormData()
        form.add_field("image", image, filename="a.jpg", content_type="image/jpeg")
        request = session.post(f"{base}/classify", data=form)
    elif kind == "classify_batch":
        form = aiohttp.FormData()
        for i in range(4):
            form.add_field("images", images[rng.randrange(len(images))], filename=f"{i}.jpg", content_type="image/jpeg")
        request = session.post(f"{base}/classify_batch", data=form)
    elif kind == "v2_infer":
        body = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
        request = session.post(f"{base}/v2/models/{model}/infer", json=body)
    else:
        garbage = rng.randbytes(rng.randrange(1, 4000))
        request = session.post(f"{base}/classify", data=garbage, headers={"content-type": "image/jpeg"})
    try:
        async with request as response:
            body = await response.read()
            if response.status >= 400:
                json.loads(body)  # every error is JSON
            return str(response.status)
    except asyncio.TimeoutError:
        return "timeout"
    except (aiohttp.ClientError, ValueError) as exc:
        return type(exc).__name__


def expected(kind: str, status: str) -> bool:
    if kind == "bad":
        return status.isdigit() and 400 <= int(status) < 500
    return status == "200"


async def open_loop_mix(base: str, model: str, images: list[bytes], rate: float, seconds: float) -> list[tuple]:
    """(sent offset s, kind, status, latency s) of every request scheduled in `seconds` at `rate` per second."""
    rng = random.Random(0)
    kinds, weights = zip(*MIX, strict=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    samples: list[tuple] = []
    tasks: set[asyncio.Task] = set()

    async def one(offset: float, kind: str) -> None:
        sent = loop.time()
        status = await send(session, base, kind, images, rng, model)
        samples.append((offset, kind, status, loop.time() - sent))

    async with client_session() as session:
        count = int(rate * seconds)
        for i in range(count):
            offset = i / rate
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(offset, rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 5) if tasks else None
    return samples


def sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    """Every RSS_EVERY_S: (seconds since start, the largest worker's RSS in bytes) of the server's process tree."""
    started = time.monotonic()
    root = psutil.Process(pid)
    while not stop.wait(RSS_EVERY_S):
        try:
            workers = [p for p in root.children(recursive=True) if "python" in p.name().lower()]
            out.append((time.monotonic() - started, max(p.memory_info().rss for p in workers)))
        except (psutil.Error, ValueError):
            pass


def window_p99(samples: list[tuple], start: float, end: float) -> float | None:
    latencies = [
        lat for offset, kind, status, lat in samples if start <= offset < end and kind != "bad" and status == "200"
    ]
    return round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None


def run(args: argparse.Namespace) -> dict:
    # Read before the run: the tree may move on during a long one.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    images = read_test_jpegs(args.archive, 256)
    model = json.loads((args.package / "manifest.json").read_text())["name"]
    env = {"VISIONSERVE_MODEL": str(args.package.resolve())}
    with BentoServer(SERVICE, env, log_dir=LOGS, name="soak") as server:
        rates = []
        for concurrency in (8, 32):
            phase = asyncio.run(closed_loop("service", f"{server.url}/classify", images, concurrency, 15, 5))
            rates.append(phase.requests_per_second)
        saturation = max(rates)
        rate = args.load * saturation
        print(f"saturation {saturation:.0f} requests/s; soaking at {rate:.0f}/s for {args.minutes} min", flush=True)
        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(server.process.pid, stop, rss), daemon=True)
        sampler.start()
        seconds = args.minutes * 60
        samples = asyncio.run(open_loop_mix(server.url, model, images, rate, seconds))
        stop.set()
        sampler.join()
    unexpected: dict[str, int] = {}
    counts: dict[str, int] = {}
    for _, kind, status, _ in samples:
        counts[kind] = counts.get(kind, 0) + 1
        if not expected(kind, status):
            unexpected[f"{kind} {status}"] = unexpected.get(f"{kind} {status}", 0) + 1
    window = min(WINDOW_S, seconds / 3)
    warm = [r for t, r in rss if t >= 60] or [r for _, r in rss]
    return {
        "command": "python -m benchmarks.soak " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "package": model,
        "commit": commit,
        "saturation_rps": saturation,
        "rate_rps": round(rate, 1),
        "minutes": args.minutes,
        "requests": len(samples),
        "by_kind": counts,
        "unexpected": unexpected,
        "p99_first_window_ms": window_p99(samples, 0, window),
        "p99_last_window_ms": window_p99(samples, seconds - window, seconds),
        "window_s": window,
        "rss_after_warmup_mb": round(warm[0] / 2**20, 1) if warm else None,
        "rss_end_mb": round(warm[-1] / 2**20, 1) if warm else None,
        "rss_max_mb": round(max(warm) / 2**20, 1) if warm else None,
        "rss_samples": [(round(t), round(r / 2**20, 1)) for t, r in rss],
    }


def markdown(r: dict) -> str:
    m = r["machine"]
    growth = (r["rss_end_mb"] / r["rss_after_warmup_mb"] - 1) if r["rss_after_warmup_mb"] else None
    p99 = (r["p99_last_window_ms"] / r["p99_first_window_ms"]) if r["p99_first_window_ms"] else None
    unexpected = sum(r["unexpected"].values())
    lines = [
        "# Soak test",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), no GPU; load average at start {m['load_average_at_start']}  ",
        f"Model package: `{r['package']}`; code at commit {r['commit']}",
        "",
        f"Saturation (closed loop, /classify): {r['saturation_rps']:.0f} requests/s; soak at {r['rate_rps']:.0f} "
        f"requests/s for {r['minutes']} min: {r['requests']} requests ({r['by_kind']}).",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| unexpected answers (good request not 200, bad input not a 4xx JSON) | {unexpected} {r['unexpected'] or ''} | 0 |",
        f"| largest worker's RSS after warm-up (1 min) -> end (max) | {r['rss_after_warmup_mb']} -> {r['rss_end_mb']} MB "
        f"({r['rss_max_mb']} MB){'' if growth is None else f', {growth:+.1%}'} | growth under 5% |",
        f"| p99 of good requests, first vs last {r['window_s'] / 60:.0f} min | {r['p99_first_window_ms']} vs "
        f"{r['p99_last_window_ms']} ms{'' if p99 is None else f' ({p99:.2f}x)'} | last within 1.2x of first |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True, help="the model package to serve")
    parser.add_argument("--minutes", type=float, default=30, help="soak duration (default %(default)s)")
    parser.add_argument("--load", type=float, default=0.7, help="fraction of saturation (default %(default)s)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.md", help="markdown report (JSON beside it)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
