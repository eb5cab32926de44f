"""The addresses the server listens on (HTTP and gRPC), checked in `bentoml serve` before any worker starts.

A taken HTTP port used to stop `bentoml serve` with a traceback of BentoML's process manager, and a gRPC port that
cannot be bound made every worker fail its start, restarted by BentoML forever. `check` finds both first, so the
service's deployment hook can stop the command with one line.
"""

from __future__ import annotations

import socket

import click
from bentoml._internal.configuration.containers import BentoMLContainer

from service.settings import ServiceSettings


class CannotListen(RuntimeError):
    """An address the server is configured to listen on cannot be bound now."""


def address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets (`[::]:8001`), as gRPC takes it and as a reader expects it."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_address() -> tuple[str, int]:
    """The host and port `bentoml serve` is about to bind for HTTP.

    Its `--host` and `--port` (or BENTOML_PORT) reach BentoML's server only as arguments, never its configuration,
    so they are read from the command's own click context; outside the command, BentoML's configuration.
    """
    context = click.get_current_context(silent=True)
    options = context.params if context is not None else {}
    host = options.get("host") or BentoMLContainer.http.host.get()
    port = options.get("port") or BentoMLContainer.http.port.get()
    return host, int(port)


def probe(host: str, port: int) -> None:
    """Bind the address and let it go; OSError when it cannot be bound (taken, or not this machine's)."""
    family, kind, protocol, _, where = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, protocol) as held:
        # As every server socket: a stopped server's closing connections (TIME_WAIT) leave the port free. No
        # SO_REUSEPORT, so a port that another server's workers share (theirs have it) is found taken too.
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(where)


def check(settings: ServiceSettings) -> None:
    """Raise CannotListen, naming the settings to change, unless the HTTP address and the gRPC one (when gRPC is
    on) can both be bound now and are not the same port."""
    host, port = http_address()
    checks = [("HTTP", host, port, "--host, --port or BENTOML_PORT")]
    if settings.grpc_port:
        if settings.grpc_port == port:
            raise CannotListen(f"gRPC cannot listen on port {port}, the HTTP port: set VISIONSERVE_GRPC_PORT or --port")
        checks.append(("gRPC", settings.grpc_host, settings.grpc_port, "VISIONSERVE_GRPC_HOST, VISIONSERVE_GRPC_PORT"))
    for protocol, host, port, names in checks:
        try:
            probe(host, port)
        except OSError as exc:
            where = address(host, port)
            raise CannotListen(f"{protocol} cannot listen on {where} ({names}): {exc.strerror or exc}") from None
