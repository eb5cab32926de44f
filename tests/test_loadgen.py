"""Tests of benchmarks.loadgen's open-loop client: its requests, its latency accounting (from each request's due
time, however long it waited for a connection) and what it does with a server that never answers."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from benchmarks.loadgen import multipart_request, open_loop
from service.multipart import FilePart, simple_form

JPEG = b"\xff\xd8 not really a jpeg \xff\xd9"


def test_the_request_is_a_multipart_form_that_the_service_reads_in_one_pass():
    request = multipart_request("http://127.0.0.1:8000/predictions/classifier", JPEG)
    head, body = request.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /predictions/classifier HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Host"] == "127.0.0.1:8000" and int(headers["Content-Length"]) == len(body)
    [(name, part)] = simple_form(body, headers["Content-Type"], max_files=1, max_fields=1)
    assert name == "image" and isinstance(part, FilePart)
    assert part.filename == "image.jpg" and part.data == JPEG


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Answers 200 after `delay_s`, one request at a time, on keep-alive connections."""

    protocol_version = "HTTP/1.1"
    delay_s = 0.05
    close_connection_after = False  # answer with Connection: close

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.delay_s)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        if self.close_connection_after:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@contextmanager
def slow_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), SlowHandler)  # one request at a time
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/classify"
    finally:
        server.shutdown()
        server.server_close()


def test_below_capacity_every_request_is_answered_at_the_rate():
    with slow_server() as url:  # 20 answers a second at most
        phase = asyncio.run(open_loop("slow", url, [JPEG], rate=10, duration=1.0, warmup=0.2, connections=1))
    assert phase.kind == "open" and phase.target_rate == 10
    assert phase.statuses == {"200": 10}
    assert 50 <= phase.p50_ms < 100  # the server's 50 ms, little more: no request waited for another
    assert phase.client_cpu_us_per_request > 0 and phase.client_late_p99_ms is not None


def test_latency_counts_from_the_due_time_when_requests_wait_for_the_connection():
    # 40 requests a second on one connection to a server that answers 20: a closed-loop client would report
    # 50 ms each; here the later requests have waited their turn, and that wait is their latency.
    with slow_server() as url:
        phase = asyncio.run(open_loop("slow", url, [JPEG], rate=40, duration=1.0, warmup=0, connections=1))
    assert phase.statuses == {"200": 40}
    assert phase.p99_ms > 700  # the last of 40 answered near 2 s after start, due at 1 s
    assert phase.requests_per_second == pytest.approx(40, abs=1)  # answers to the window's requests, per second


def test_a_server_that_never_answers_leaves_every_request_unanswered_with_its_wait():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # accepted by the kernel, never read
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/classify"
        started = time.monotonic()
        phase = asyncio.run(open_loop("mute", url, [JPEG], rate=20, duration=0.5, warmup=0, drain_s=0.5))
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert phase.ok == 0 and phase.statuses == {"unanswered": 10}
    assert phase.p50_ms >= 500  # each waited at least the drain time: a lower bound of its latency
    assert elapsed < 3


def test_a_server_that_refuses_connections_stops_the_run_before_it_starts():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(open_loop("gone", f"http://127.0.0.1:{port}/classify", [JPEG], rate=20, duration=0.25, warmup=0))


def test_a_connection_the_server_closes_is_opened_again():
    with slow_server() as url:
        SlowHandler.close_connection_after = True
        try:
            phase = asyncio.run(open_loop("closing", url, [JPEG], rate=10, duration=0.5, warmup=0, connections=1))
        finally:
            SlowHandler.close_connection_after = False
    assert phase.statuses == {"200": 5}
