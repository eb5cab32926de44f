"""uvicorn's HTTP protocol with the service's limits on connections, which uvicorn does not set.

Request heads: uvicorn's keep-alive timeout only runs from a response to the next byte, so a connection that never
sends a byte, or sends a head a byte at a time (slowloris), is held for ever, and the ASGI app never hears of it
(it is called once the head is complete); nor does uvicorn's httptools parser bound a head's size. Enough such
connections use up a worker's file descriptors or memory, and then no client is served. So every connection must
deliver each request head within `head_timeout_s` (from the connection's opening or its last response) and in at
most MAX_HEAD_BYTES: past either, the connection is closed, with a JSON 408 or 431 if part of a head had arrived. A
request's body is covered by the request deadline (VISIONSERVE_REQUEST_TIMEOUT_S: service.request_reading). A head
that uvicorn's parser cannot read gets a JSON 400 instead of uvicorn's plain text.

Connection age: a keep-alive connection stays with the replica that accepted it, so replicas added behind a
Kubernetes Service (a TCP balancer) get none of the existing clients' requests. A connection older than `max_age_s`
answers the next request it begins with `Connection: close`; the client opens a new connection, which the balancer
may give to any replica (nginx's keepalive_time; the gRPC port has gRPC's max connection age).

One sweep a second per server closes the connections overdue with a head, so a request costs a clock reading, not a
timer. BentoML builds uvicorn's configuration itself with the default `auto` HTTP protocol; install() points that
name at uvicorn's own protocol with these limits mixed in. The service installs it at import, which in each worker
comes before BentoML starts uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from http import HTTPStatus

import uvicorn.config
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import ERRORS

MAX_HEAD_BYTES = 64 * 1024  # nginx allows 32 KiB of headers by default, h11 in uvicorn 16 KiB
SWEEP_INTERVAL_S = 1.0


def refusal(code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer with the service's JSON error body, closing the connection."""
    status = HTTPStatus(ERRORS[code].status)
    body = json.dumps({"error": message, "code": code}).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionLimits:
    """Mixed into a uvicorn HTTP protocol class (it uses the protocol's loop, transport, cycle and server state).
    A limit of 0 is off."""

    head_timeout_s: float = 10.0
    max_age_s: float = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self.opened_at = self.head_since = self.loop.time()
        self.head_bytes = 0
        if self.head_timeout_s:
            Sweep.ensure(self.loop, self.server_state, self.head_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.awaiting_head():
            # What arrived while no request is in progress, and did not complete a head, is part of the next head;
            # unless the last request's body is still coming (answered before it was all read), which uvicorn drops.
            if self.cycle is None or not self.cycle.more_body:
                self.head_bytes += len(data)
            if self.head_timeout_s and self.head_bytes > MAX_HEAD_BYTES:
                self.close_with(refusal("request_head_too_large", f"the request head is over {MAX_HEAD_BYTES} bytes"))
        elif self.max_age_s and self.cycle.keep_alive and self.loop.time() - self.opened_at > self.max_age_s:
            # A request that begins past the age is the connection's last: uvicorn answers it with
            # `Connection: close` and then closes.
            self.cycle.keep_alive = False
            if isinstance(self, H11Protocol):
                # uvicorn's h11 cycle writes that header only for a request that asked for it, so the request asks.
                self.cycle.scope["headers"].append((b"connection", b"close"))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.head_since = self.loop.time()
        self.head_bytes = 0

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers bytes that its parser cannot read (an https:// client at the plain port, say) in plain
        # text; every refusal of the service is JSON.
        self.close_with(refusal("invalid_http", f"the request is not valid HTTP/1.1: {msg}"))

    def awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def overdue(self, now: float) -> bool:
        return self.awaiting_head() and now - self.head_since > self.head_timeout_s and not self.transport.is_closing()

    def close_overdue(self) -> None:
        # A connection that sent nothing is closed as uvicorn closes an idle keep-alive one: without an answer.
        message = f"the request head did not arrive within {self.head_timeout_s:g} s"
        self.close_with(refusal("request_head_timeout", message) if self.head_bytes else b"")

    def close_with(self, answer: bytes) -> None:
        if answer:
            self.transport.write(answer)
        self.transport.close()


class Sweep:
    """Closes a server's connections that are overdue with a head, every `interval_s`, while its loop runs."""

    swept: weakref.WeakSet = weakref.WeakSet()  # the uvicorn server states with a sweep, one each

    def __init__(self, loop: asyncio.AbstractEventLoop, server_state: object, interval_s: float) -> None:
        self.loop = loop
        self.server_state = weakref.ref(server_state)
        self.interval_s = interval_s

    @classmethod
    def ensure(cls, loop: asyncio.AbstractEventLoop, server_state: object, timeout_s: float) -> None:
        if server_state not in cls.swept:
            cls.swept.add(server_state)
            cls(loop, server_state, min(SWEEP_INTERVAL_S, timeout_s)).schedule()

    def schedule(self) -> None:
        self.loop.call_later(self.interval_s, self.run)

    def run(self) -> None:
        server_state = self.server_state()
        if server_state is None or self.loop.is_closed():
            return
        now = self.loop.time()
        for connection in list(server_state.connections):
            if isinstance(connection, ConnectionLimits) and connection.overdue(now):
                connection.close_overdue()
        self.schedule()


class LimitedHTTPProtocol(ConnectionLimits, AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools where installed, else h11) with the connection limits."""


def install(head_timeout_s: float, max_age_s: float) -> None:
    """Serve every HTTP connection uvicorn accepts in this process with these limits (0: off); both off: uvicorn's
    own protocol, untouched."""
    if not head_timeout_s and not max_age_s:
        return
    LimitedHTTPProtocol.head_timeout_s = head_timeout_s
    LimitedHTTPProtocol.max_age_s = max_age_s
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{LimitedHTTPProtocol.__name__}"


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit, as Go's runtime and nginx's workers do.

    Every connection is a file descriptor, and the soft limit is often 1,024 (systemd's default for services)
    where the hard limit allows far more; the event loop uses epoll, which has no such bound of its own."""
    try:
        import resource  # Unix only: Windows has no such limit on sockets
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    # An unlimited hard limit can be above what the kernel allows (nr_open): then the soft one stays.
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
