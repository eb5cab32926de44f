"""The load generator: closed-loop HTTP clients (aiohttp, or wrk) and an open-loop one against /classify, and their
phases."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from benchmarks.servers import REPO, BentoServer

WRK_SCRIPT = REPO / "benchmarks" / "wrk_classify.lua"
CLIENTS = {
    "wrk": "wrk (C, one thread; benchmarks/wrk_classify.lua)",
    "python": "this script's aiohttp workers",
}
OPEN_LOOP_CONNECTIONS = 64  # the open-loop client's keep-alive connections, opened together
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
    client_cpu_us_per_request: float | None = None  # open loop: the client's own CPU
    client_late_p99_ms: float | None = None  # open loop: how late the client sent (its own lag, in the latency)

    def figures(self) -> dict:
        """The figures a comparison keeps per measurement: rate, p50, p99 and every outcome's count; for an open
        loop also its target rate and the client's own cost."""
        figures = {
            "requests_per_second": self.requests_per_second,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "statuses": self.statuses,
        }
        if self.kind == "open":
            figures |= {
                "target_rate": self.target_rate,
                "client_cpu_us_per_request": self.client_cpu_us_per_request,
                "client_late_p99_ms": self.client_late_p99_ms,
            }
        return figures


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


# ---- open loop ------------------------------------------------------------------------------------------------


def multipart_request(url: str, image: bytes, field: str = "image") -> bytes:
    """One POST of `image` as a multipart form field, as bytes ready to write: the body wrk_classify.lua sends."""
    parts = urlsplit(url)
    boundary = "----visionserve-load-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection of the open-loop client, one request at a time; httptools parses the answers."""

    def __init__(self, client: _OpenLoopClient) -> None:
        import httptools

        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.scheduled: float | None = None  # the request on the wire: when it was due
        self.retry_after = False

    def send(self, request: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        self.transport.write(request)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client.connected(self)

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = True

    def on_message_complete(self) -> None:
        scheduled, self.scheduled = self.scheduled, None
        self.client.answered(self, scheduled, str(self.parser.get_status_code()), self.retry_after)
        self.retry_after = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class _OpenLoopClient:
    """`connections` keep-alive connections, opened before the first request and used in turn, so that a server's
    workers (each accepted some of them) share the load as they would many clients'. A request due while every
    connection is busy waits here, its latency still counting from when it was due. A connection the server
    closes is opened again."""

    def __init__(self, host: str, port: int, connections: int) -> None:
        self.host, self.port, self.connections = host, port, connections
        self.idle: collections.deque[_Connection] = collections.deque()
        self.busy: set[_Connection] = set()
        self.opening = 0
        self.backlog: collections.deque[tuple[float, bytes]] = collections.deque()
        self.samples: list[tuple[float, float, str, bool]] = []  # (due, latency_s, status, has_retry_after)
        self.closed = False

    async def connect(self) -> None:
        """Open every connection at once, as a pool warming up (or wrk) does; raises if the server refuses."""
        loop = asyncio.get_running_loop()
        self.opening += self.connections
        await asyncio.gather(
            *(loop.create_connection(lambda: _Connection(self), self.host, self.port) for _ in range(self.connections))
        )

    @property
    def unanswered(self) -> int:
        return len(self.busy) + len(self.backlog)

    def submit(self, scheduled: float, request: bytes) -> None:
        if self.idle:
            connection = self.idle.popleft()
            self.busy.add(connection)
            connection.send(request, scheduled)
            return
        self.backlog.append((scheduled, request))
        self._reopen()

    def _reopen(self) -> None:
        """Open a connection again if the server closed one and requests wait."""
        if not self.closed and self.backlog and len(self.busy) + len(self.idle) + self.opening < self.connections:
            self.opening += 1
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.create_connection(lambda: _Connection(self), self.host, self.port))
            task.add_done_callback(self._reopened)

    def _reopened(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.opening -= 1
            if self.backlog and not (self.busy or self.idle or self.opening):  # nothing else will ever send it
                scheduled, _ = self.backlog.popleft()
                self.samples.append((scheduled, time.perf_counter() - scheduled, "connection_error", False))
                self._reopen()

    def connected(self, connection: _Connection) -> None:
        self.opening -= 1
        self._next(connection)

    def _next(self, connection: _Connection) -> None:
        if self.backlog:
            scheduled, request = self.backlog.popleft()
            self.busy.add(connection)
            connection.send(request, scheduled)
        else:
            self.busy.discard(connection)
            self.idle.append(connection)

    def answered(self, connection: _Connection, scheduled: float, status: str, retry: bool) -> None:
        self.samples.append((scheduled, time.perf_counter() - scheduled, status, retry))
        if connection.parser.should_keep_alive():
            self._next(connection)
        else:  # the server closes it: no next request on it (connection_lost opens another if needed)
            self.busy.discard(connection)
            connection.transport.close()

    def lost(self, connection: _Connection) -> None:
        if connection.scheduled is not None:
            due = connection.scheduled
            self.samples.append((due, time.perf_counter() - due, "connection_error", False))
        self.busy.discard(connection)
        if connection in self.idle:
            self.idle.remove(connection)
        self._reopen()

    def close(self) -> list[float]:
        """Close every connection; the due times of the requests still unanswered."""
        self.closed = True
        waiting = [c.scheduled for c in self.busy if c.scheduled is not None] + [due for due, _ in self.backlog]
        for connection in [*self.busy, *self.idle]:
            connection.transport.close()
        return waiting


async def open_loop(
    server: str,
    url: str,
    images: list[bytes],
    rate: float,
    duration: float,
    warmup: float,
    connections: int = OPEN_LOOP_CONNECTIONS,
    drain_s: float = 5.0,
) -> Phase:
    """Requests sent at a fixed rate whatever the answers (no coordinated omission): each request's latency counts
    from when it was due, including any wait for a free connection. After the window, answers are awaited for
    `drain_s`; a request still unanswered then counts as "unanswered" and its wait so far enters the percentiles
    (a lower bound of its latency). The client's own cost is reported: its CPU per request and how late it sent.

    Raw keep-alive connections and prepared requests (asyncio protocols, httptools) keep the client's CPU per
    request low, which matters at thousands of requests a second on cores shared with the server."""
    parts = urlsplit(url)
    requests = [multipart_request(url, image) for image in images]
    client = _OpenLoopClient(parts.hostname, parts.port or 80, connections)
    await client.connect()
    total = int(rate * (warmup + duration))
    cpu_start = time.process_time()
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration
    lateness: list[float] = []
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due_now = min(total, int((now - start) * rate) + 1)
        while sent < due_now:
            scheduled = start + sent / rate
            lateness.append(now - scheduled)
            client.submit(scheduled, requests[sent % len(requests)])
            sent += 1
        # At least a millisecond: the event loop's timers count whole milliseconds, and a shorter sleep would spin
        # (taking a core from the server); requests due meanwhile go out together, their lateness recorded.
        await asyncio.sleep(max(0.001, start + sent / rate - time.perf_counter()))
    drain_end = time.perf_counter() + drain_s
    while client.unanswered and time.perf_counter() < drain_end:
        await asyncio.sleep(0.01)
    ended = time.perf_counter()
    cpu_seconds = time.process_time() - cpu_start
    waiting = client.close()
    measured = [(latency, status, retry) for due, latency, status, retry in client.samples if due >= window_start]
    unanswered = [ended - due for due in waiting if due >= window_start]
    phase = summarise(server, "open", connections, window_end - window_start, measured)
    phase.target_rate = round(rate, 1)
    if unanswered:
        phase.statuses["unanswered"] = len(unanswered)
        waits = [latency for latency, status, _ in measured if status == "200"] + unanswered
        phase.p50_ms, phase.p95_ms, phase.p99_ms = (round(1000 * v, 1) for v in np.percentile(waits, [50, 95, 99]))
    phase.client_cpu_us_per_request = round(1e6 * cpu_seconds / max(1, sent), 1)
    phase.client_late_p99_ms = round(1000 * float(np.percentile(lateness, 99)), 2) if lateness else None
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
