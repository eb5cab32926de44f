"""The addresses the server listens on (HTTP and gRPC), checked in `bentoml serve` before any worker starts.

A taken HTTP port used to stop `bentoml serve` with a traceback of BentoML's process manager, and a gRPC port that
cannot be bound made every worker fail its start, restarted by BentoML forever. `check` finds both first, so the
service's deployment hook can stop the command with one line. It also refuses a plaintext gRPC port beside an HTTP
port with TLS, and gRPC TLS files that do not load.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
from typing import Any

import click
from bentoml._internal.configuration.containers import BentoMLContainer

from service.settings import ServiceSettings, SettingsError


class CannotListen(RuntimeError):
    """An address the server is configured to listen on cannot be bound now."""


def address(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets (`[::]:8001`), as gRPC takes it and as a reader expects it."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve_option(name: str) -> Any:
    """An option of the `bentoml serve` command running this process (None outside it, or when not given)."""
    context = click.get_current_context(silent=True)
    return context.params.get(name) if context is not None else None


def http_address() -> tuple[str, int]:
    """The host and port `bentoml serve` is about to bind for HTTP.

    Its `--host` and `--port` (or BENTOML_PORT) reach BentoML's server only as arguments, never its configuration,
    so they are read from the command's own click context; outside the command, BentoML's configuration.
    """
    host = serve_option("host") or BentoMLContainer.http.host.get()
    port = serve_option("port") or BentoMLContainer.http.port.get()
    return str(host), int(port)


def http_has_tls() -> bool:
    """Whether `bentoml serve` serves HTTP with TLS (--ssl-certfile, or BentoML's ssl configuration)."""
    return bool(serve_option("ssl_certfile") or BentoMLContainer.ssl.certfile.get())


def check_grpc_tls(settings: ServiceSettings) -> None:
    """Raise CannotListen if gRPC's TLS files do not load as a certificate and its key, or if gRPC would be
    plaintext while HTTP has TLS."""
    where = address(settings.grpc_host, settings.grpc_port)
    if not settings.grpc_tls_certfile:
        if http_has_tls():
            raise CannotListen(
                f"HTTP has TLS (--ssl-certfile) but gRPC on {where} would be plaintext: set "
                "VISIONSERVE_GRPC_TLS_CERTFILE and VISIONSERVE_GRPC_TLS_KEYFILE (the same files serve), or "
                "VISIONSERVE_GRPC_PORT=0"
            )
        return
    try:  # what grpcio would refuse only in each worker, after the start
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            # grpcio takes no passphrase; without this, OpenSSL would ask for one on the terminal.
            settings.grpc_tls_certfile,
            settings.grpc_tls_keyfile,
            password=lambda: b"",
        )
    except OSError as exc:  # ssl.SSLError included
        raise CannotListen(
            f"gRPC TLS: {settings.grpc_tls_certfile} and {settings.grpc_tls_keyfile} (VISIONSERVE_GRPC_TLS_CERTFILE, "
            f"VISIONSERVE_GRPC_TLS_KEYFILE) do not load as a certificate and its key: {exc.strerror or exc}"
        ) from None


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


def check(settings: ServiceSettings, http: tuple[str, int] | None = None) -> None:
    """Raise CannotListen, naming the settings to change, unless the HTTP address (`http`, else the serve
    command's) and the gRPC one (when gRPC is on) can both be bound now, are not the same port, and gRPC has working
    TLS where HTTP has TLS."""
    http_host, http_port = http or http_address()
    checks = [("HTTP", http_host, http_port, "--host, --port or BENTOML_PORT")]
    if settings.grpc_port:
        if settings.grpc_port == http_port:
            raise CannotListen(
                f"gRPC cannot listen on port {http_port}, the HTTP port: set VISIONSERVE_GRPC_PORT or --port"
            )
        check_grpc_tls(settings)
        checks.append(("gRPC", settings.grpc_host, settings.grpc_port, "VISIONSERVE_GRPC_HOST, VISIONSERVE_GRPC_PORT"))
    for protocol, host, port, names in checks:
        try:
            probe(host, port)
        except OSError as exc:
            raise CannotListen(
                f"{protocol} cannot listen on {address(host, port)} ({names}): {exc.strerror or exc}"
            ) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m service.listening --port PORT`: the deployment hook's check, before `bentoml serve` is run at all.

    BentoML empties its home's metrics folder when `bentoml serve` starts, before any hook runs, so a second server
    refused by the hook has already emptied the running one's /metrics; the Makefile's `serve` checks first.
    """
    parser = argparse.ArgumentParser(prog="python -m service.listening", description=main.__doc__.splitlines()[0])
    parser.add_argument("--host", default=BentoMLContainer.http.host.get(), help="HTTP host (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=BentoMLContainer.http.port.get(), help="HTTP port (default %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        check(ServiceSettings.from_env(os.environ), (args.host, args.port))
    except (SettingsError, CannotListen) as exc:
        print(f"visionserve: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
