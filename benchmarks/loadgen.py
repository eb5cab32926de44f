"""The load generator: closed- and open-loop HTTP clients (aiohttp, or wrk) against /classify, and their phases."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.servers import REPO, BentoServer

WRK_SCRIPT = REPO / "benchmarks" / "wrk_classify.lua"
CLIENTS = {
    "wrk": "wrk (C, one thread; benchmarks/wrk_classify.lua)",
    "python": "this script's aiohttp workers",
}
REQUEST_TIMEOUT_S = 30.0  # client side; a request still unanswered by then counts as "timeout"


# ---- phases ----------------------------------------------------------------------------------------------------


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

    def figures(self) -> dict:
        """The figures a comparison keeps per measurement: rate, p50, p99 and every outcome's count."""
        return {
            "requests_per_second": self.requests_per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "statuses": self.statuses,
        }


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


# ---- clients ---------------------------------------------------------------------------------------------------


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


# ---- wrk -------------------------------------------------------------------------------------------------------


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


def wrk_closed_loop(
    server: str,
    url: str,
    listing: Path,
    concurrency: int,
    duration: float,
    warmup: float,
    headers: dict[str, str] | None = None,
) -> Phase:
    """closed_loop's measurement made by wrk (C, one thread): `concurrency` connections, each sending its next
    request when the last is answered. It costs a fraction of the Python client's CPU, which shares the cores
    with the server under test. Warm-up is a separate wrk run whose figures are dropped. `headers` go with every
    request."""
    header_options = [f"-H{name}: {value}" for name, value in (headers or {}).items()]

    def run_wrk(seconds: float) -> dict:
        command = [
            "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={REQUEST_TIMEOUT_S:g}s",
            *header_options, "-s", str(WRK_SCRIPT), url, "--", str(listing),
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


# ---- sweeps ----------------------------------------------------------------------------------------------------


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


def best_concurrency(
    server: str, url: str, listing: Path, concurrencies: list[int], seconds: float, warmup: float
) -> dict:
    """wrk at each concurrency: {"best_concurrency": c, "by_concurrency": {str(c): figures}} (string keys, as
    JSON writes them), the best by requests/s."""
    by_concurrency = {}
    for concurrency in concurrencies:
        by_concurrency[str(concurrency)] = wrk_closed_loop(server, url, listing, concurrency, seconds, warmup).figures()
    best = max(by_concurrency, key=lambda c: by_concurrency[c]["requests_per_second"])
    return {"best_concurrency": int(best), "by_concurrency": by_concurrency}


def best_rate_of(figures: dict) -> float:
    """The requests/s of best_concurrency's best concurrency."""
    return figures["by_concurrency"][str(figures["best_concurrency"])]["requests_per_second"]


def rounds_table(rounds: list[dict[str, dict]], names: list[str]) -> list[str]:
    """Markdown rows: each round's best requests/s (and at which concurrency) of every server, by name."""
    lines = [
        "| round | " + " | ".join(f"{name} req/s (best c)" for name in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for index, figures in enumerate(rounds, 1):
        cells = [f"{best_rate_of(figures[name])} ({figures[name]['best_concurrency']})" for name in names]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    return lines


def best_phase(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.requests_per_second)


def best_rate(phases: list[Phase]) -> float:
    return best_phase(phases).requests_per_second
