"""The connection limits: heads held back, heads too large, bytes that are not HTTP, and old connections, on both of
uvicorn's parsers and in the real service."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import tritonclient.http as httpclient
import uvicorn
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from inference.imaging import encode_png
from service import http_protocol
from service.http_protocol import MAX_HEAD_BYTES, ConnectionLimits
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import color_pixels, make_color_package
from tests.support.servers import SERVICE_TEST_SETTINGS, serving, slow_app, start_server, stop_server, workers

TIMEOUT_S = 0.5
PARSERS = {
    "httptools": type("FastHttpTools", (ConnectionLimits, HttpToolsProtocol), {"head_timeout_s": TIMEOUT_S}),
    "h11": type("FastH11", (ConnectionLimits, H11Protocol), {"head_timeout_s": TIMEOUT_S}),
}


@pytest.fixture(params=sorted(PARSERS))
def server_port(request) -> Iterator[int]:
    with serving(PARSERS[request.param]) as port:
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def answers(received: bytes) -> list[tuple[int, bytes]]:
    """The (status, body) of each HTTP/1.1 answer in `received`, in order."""
    found = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(headers[b"content-length"])
        found.append((int(lines[0].split()[1]), rest[:length]))
        received = rest[length:]
    return found


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server_port):
    connection = connect(server_port)
    opened = time.monotonic()
    assert read_until_closed(connection) == b""
    assert TIMEOUT_S <= time.monotonic() - opened < 5


def test_a_head_sent_too_slowly_gets_a_json_408_and_the_connection_is_closed(server_port):
    connection = connect(server_port)
    opened = time.monotonic()
    connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n")  # the blank line that ends the head never comes
    ((status, body),) = answers(read_until_closed(connection))
    assert TIMEOUT_S <= time.monotonic() - opened < 5
    assert status == 408
    assert json.loads(body)["code"] == "request_head_timeout"


def test_the_deadline_counts_from_the_last_answer_and_spares_requests_in_progress(server_port):
    connection = connect(server_port)
    # A request that takes four head timeouts to answer is answered in full.
    connection.sendall(f"GET /?sleep={4 * TIMEOUT_S} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    received = b""
    while b"ok" not in received:
        received += connection.recv(65536)
    answered = time.monotonic()
    assert answers(received) == [(200, b"ok")]
    # The same connection then has a whole timeout from that answer for its next head, not from its opening.
    connection.sendall(b"GET / HTTP/1.1\r\n")
    ((status, _),) = answers(read_until_closed(connection))
    assert status == 408
    assert time.monotonic() - answered >= TIMEOUT_S


def test_a_head_over_the_size_limit_gets_a_json_431_and_the_connection_is_closed():
    # httptools, uvicorn's parser where installed, has no limit of its own (h11 refuses heads over 16 KiB itself).
    with serving(PARSERS["httptools"]) as port:
        connection = connect(port)
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + filler * (MAX_HEAD_BYTES // len(filler)))
        time.sleep(0.2)  # all of it read, so that the server's close leaves nothing unread (which would reset)
        connection.sendall(filler)
        ((status, body),) = answers(read_until_closed(connection))
    assert status == 431
    assert json.loads(body)["code"] == "request_head_too_large"


def test_the_rest_of_a_body_answered_early_is_not_taken_for_a_head(server_port):
    # slow_app answers after the body's first chunk; the rest, over the head size limit, is the same request's.
    connection = connect(server_port)
    connection.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n" + bytes(1000))
    time.sleep(0.1)
    connection.sendall(bytes(999_000))
    connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")  # the next request on the same connection
    received = b""
    while received.count(b"ok") < 2:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received!r}"
        received += chunk
    assert [head.split(b"\r\n")[0] for head in response_heads(received)] == [b"http/1.1 200 ok"] * 2


def test_bytes_that_are_not_http_get_a_json_400(server_port):
    connection = connect(server_port)
    # The start of a TLS ClientHello: an https:// client at the plain HTTP port.
    connection.sendall(bytes.fromhex("1603010200010001fc0303") + bytes(40))
    ((status, body),) = answers(read_until_closed(connection))
    assert status == 400
    assert json.loads(body) == {
        "error": "the request is not valid HTTP/1.1: Invalid HTTP request received.",
        "code": "invalid_http",
    }


def test_install_points_uvicorns_default_protocol_at_the_limited_one(monkeypatch):
    protocol = http_protocol.LimitedHTTPProtocol
    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    monkeypatch.setattr(protocol, "head_timeout_s", protocol.head_timeout_s)
    monkeypatch.setattr(protocol, "max_age_s", protocol.max_age_s)
    http_protocol.install(0, 0)
    config = uvicorn.Config(slow_app)
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    http_protocol.install(3, 0)
    config = uvicorn.Config(slow_app)
    config.load()
    assert config.http_protocol_class is protocol
    assert (protocol.head_timeout_s, protocol.max_age_s) == (3, 0)


def response_heads(received: bytes) -> list[bytes]:
    """The head (status line and headers, lower-cased) of each answer in `received`, which are all `ok` bodies."""
    return [head.lower() for head in received.split(b"ok")[:-1]]


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_a_connection_older_than_the_max_age_is_answered_with_connection_close(parser):
    aging = type("Aging", (PARSERS[parser],), {"max_age_s": 0.5, "head_timeout_s": 10})
    request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    with serving(aging) as port:
        connection = connect(port)
        connection.sendall(request)
        first = connection.recv(65536)
        time.sleep(0.3)
        connection.sendall(request)  # answered after 0.3 s: still young
        second = connection.recv(65536)
        time.sleep(0.3)
        connection.sendall(request)  # answered after 0.6 s: its last, and the server closes it
        sent = time.monotonic()
        last = read_until_closed(connection)
        closed_after_s = time.monotonic() - sent
    assert [b"connection: close" in head for head in response_heads(first + second)] == [False, False]
    assert response_heads(last)[0].startswith(b"http/1.1 200")
    assert closed_after_s < 2  # by the age, not by uvicorn's 5 s keep-alive timeout
    assert b"connection: close" in response_heads(last)[0]


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"the hard limit on open files ({hard}) cannot show the soft one raised")
    code = (
        "import resource; from service.http_protocol import raise_open_files_limit; "
        "raise_open_files_limit(); print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    )

    def lower_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    result = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lower_soft_limit, capture_output=True, text=True, check=True
    )
    assert tuple(map(int, result.stdout.split())) == (hard, hard)


@pytest.mark.slow
@pytest.mark.e2e
def test_the_service_closes_slow_heads_and_raises_its_open_files_limit(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"the hard limit on open files ({hard}) cannot show the soft one raised")
    # The server inherits a low soft limit, as under systemd (1,024 by default), and raises it in every process.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        running = start_server(
            make_color_package(tmp_path / "color"),
            tmp_path,
            {**SERVICE_TEST_SETTINGS, "VISIONSERVE_REQUEST_HEAD_TIMEOUT_S": "1"},
        )
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        # Every process of the server: a connection is a file descriptor.
        for process in [psutil.Process(running.process.pid), *workers(running.process.pid)]:
            assert process.rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
        port = int(running.url.rsplit(":", 1)[1])
        connection = connect(port)
        connection.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\n")
        ((status, body),) = answers(read_until_closed(connection))
        assert status == 408
        assert json.loads(body) == {
            "error": "the request head did not arrive within 1 s",
            "code": "request_head_timeout",
        }
    finally:
        stop_server(running)


def test_negative_limits_are_refused_with_their_variable():
    with pytest.raises(SettingsError, match="REQUEST_HEAD_TIMEOUT_S must be >= 0"):
        ServiceSettings.from_env({"VISIONSERVE_REQUEST_HEAD_TIMEOUT_S": "-1"})
    assert ServiceSettings.from_env({"VISIONSERVE_REQUEST_HEAD_TIMEOUT_S": "0"}).request_head_timeout_s == 0
    with pytest.raises(SettingsError, match="CONNECTION_MAX_AGE_S must be >= 0"):
        ServiceSettings.from_env({"VISIONSERVE_CONNECTION_MAX_AGE_S": "-1"})


@pytest.mark.slow
@pytest.mark.e2e
def test_clients_keep_working_across_the_connection_max_age(tmp_path):
    # Connection: close every second: tritonclient's HTTP client (geventhttpclient's pool) and httpx (batch
    # scoring's --url engine) must open new connections without failing a request.
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_CONNECTION_MAX_AGE_S": "1"}
    running = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        triton = httpclient.InferenceServerClient(running.url.removeprefix("http://"))
        pixels = httpclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        pixels.set_data_from_numpy(color_pixels("green"))
        closes = 0
        with httpx.Client(base_url=running.url, timeout=10) as client:
            end = time.monotonic() + 3.5
            while time.monotonic() < end:
                assert triton.infer("color", [pixels]).as_numpy("probabilities").argmax() == 1
                answer = client.post(
                    "/classify", content=encode_png(color_pixels("blue")[0]), headers={"content-type": "image/png"}
                )
                assert answer.json()["predictions"][0]["label"] == "blue"
                closes += answer.headers.get("connection") == "close"
        triton.close()
    finally:
        stop_server(running)
    assert closes >= 2
