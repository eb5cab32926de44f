"""service.listening: the HTTP and gRPC addresses are checked before any worker starts, with the settings to change."""

from __future__ import annotations

import click
import pytest

from benchmarks.servers import free_port
from service import listening
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import make_color_package
from tests.support.servers import listener, serve_exit
from tests.support.tls import needs_openssl, self_signed_certificate


def serve_context(**options) -> click.Context:
    """The click context of `bentoml serve` with these options, as the deployment hook finds it."""
    context = click.Context(click.Command("serve"))
    context.params = {"host": None, "port": None, **options}
    return context


def test_the_http_address_is_the_commands_own_else_bentomls_configuration():
    with serve_context(host="127.0.0.1", port=4321):
        assert listening.http_address() == ("127.0.0.1", 4321)
    with serve_context():  # neither option given: BentoML's configuration decides, as it does for the server
        assert listening.http_address() == ("0.0.0.0", 3000)
    assert listening.http_address() == ("0.0.0.0", 3000)  # outside the command


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [
        ("0.0.0.0", 3000, "0.0.0.0:3000"),
        ("localhost", 8001, "localhost:8001"),
        ("::", 8001, "[::]:8001"),
        ("[::1]", 1, "[::1]:1"),
    ],
)
def test_an_ipv6_host_is_written_in_brackets(host, port, address):
    assert listening.address(host, port) == address


@pytest.mark.parametrize("reuse_port", [False, True], ids=["another-program", "another-server"])
def test_a_taken_grpc_port_is_found_naming_its_settings(reuse_port):
    with listener(reuse_port) as held, serve_context(host="127.0.0.1", port=free_port()):
        port = held.getsockname()[1]
        settings = ServiceSettings(model="m", grpc_port=port, grpc_host="127.0.0.1")
        with pytest.raises(listening.CannotListen) as refused:
            listening.check(settings)
        assert str(refused.value) == (
            f"gRPC cannot listen on 127.0.0.1:{port} (VISIONSERVE_GRPC_HOST, VISIONSERVE_GRPC_PORT): Address already in use"
        )
    with serve_context(host="127.0.0.1", port=free_port()):
        listening.check(settings)  # the port closed, the check passes and leaves it free
        listening.check(ServiceSettings(model="m", grpc_port=0))


@pytest.mark.parametrize("reuse_port", [False, True], ids=["another-program", "another-server"])
def test_a_taken_http_port_is_found_naming_its_options(reuse_port):
    with listener(reuse_port) as held:
        port = held.getsockname()[1]
        with serve_context(host="127.0.0.1", port=port), pytest.raises(listening.CannotListen) as refused:
            listening.check(ServiceSettings(model="m", grpc_port=0))
    assert str(refused.value) == (
        f"HTTP cannot listen on 127.0.0.1:{port} (--host, --port or BENTOML_PORT): Address already in use"
    )


def test_a_host_that_is_not_this_machines_is_refused():
    with (
        serve_context(host="127.0.0.1", port=free_port()),
        pytest.raises(listening.CannotListen, match="gRPC cannot listen on not.a.host.invalid:"),
    ):
        listening.check(ServiceSettings(model="m", grpc_port=free_port(), grpc_host="not.a.host.invalid"))


def test_grpc_on_the_http_port_is_refused_before_either_binds():
    port = free_port()
    with serve_context(host="127.0.0.1", port=port), pytest.raises(listening.CannotListen) as refused:
        listening.check(ServiceSettings(model="m", grpc_port=port, grpc_host="127.0.0.1"))
    assert (
        str(refused.value) == f"gRPC cannot listen on port {port}, the HTTP port: set VISIONSERVE_GRPC_PORT or --port"
    )


@pytest.mark.e2e
def test_a_taken_http_port_stops_bentoml_serve_with_one_line(tmp_path):
    # Before, BentoML's process manager failed to bind it with a traceback of some 40 lines.
    with listener(reuse_port=False) as held:
        port = held.getsockname()[1]
        code, output = serve_exit(
            make_color_package(tmp_path / "color"), {"VISIONSERVE_GRPC_PORT": "0"}, tmp_path, port
        )
    assert code == 1, output
    assert output.strip().splitlines()[-1] == (
        f"visionserve: cannot serve: HTTP cannot listen on 0.0.0.0:{port} (--host, --port or BENTOML_PORT): Address already in use"
    )
    assert "Traceback" not in output


def grpc_settings(**tls: str) -> ServiceSettings:
    return ServiceSettings(model="m", grpc_port=free_port(), grpc_host="127.0.0.1", **tls)


def test_grpc_without_tls_beside_https_is_refused():
    with serve_context(host="127.0.0.1", port=free_port(), ssl_certfile="cert.pem"):
        with pytest.raises(
            listening.CannotListen, match="HTTP has TLS .* but gRPC on 127.0.0.1:[0-9]+ would be plaintext"
        ):
            listening.check(grpc_settings())
        listening.check(ServiceSettings(model="m", grpc_port=0))  # gRPC off: nothing in plaintext


@needs_openssl
def test_grpc_tls_files_are_loaded_before_any_worker_starts(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed_certificate(tmp_path / "other")
    with serve_context(host="127.0.0.1", port=free_port(), ssl_certfile=str(cert)):
        listening.check(grpc_settings(grpc_tls_certfile=str(cert), grpc_tls_keyfile=str(key)))
        for certfile, keyfile in [(cert, tmp_path / "missing.pem"), (cert, other_key), (key, key)]:
            with pytest.raises(listening.CannotListen, match="do not load as a certificate and its key"):
                listening.check(grpc_settings(grpc_tls_certfile=str(certfile), grpc_tls_keyfile=str(keyfile)))


def test_grpc_tls_needs_both_files():
    with pytest.raises(SettingsError, match="GRPC_TLS_CERTFILE and VISIONSERVE_GRPC_TLS_KEYFILE go together"):
        ServiceSettings(model="m", grpc_tls_certfile="cert.pem")


def test_the_command_line_check_refuses_a_taken_port_before_bentoml_serve_runs(monkeypatch, capsys):
    # The Makefile's `serve` runs it first: a refused `bentoml serve` would already have emptied the running server's
    # metrics folder (BentoML does that before any hook).
    monkeypatch.setenv("VISIONSERVE_GRPC_PORT", "0")
    with listener(reuse_port=False) as held:
        port = held.getsockname()[1]
        assert listening.main(["--host", "127.0.0.1", "--port", str(port)]) == 1
    assert capsys.readouterr().err == (
        f"visionserve: cannot serve: HTTP cannot listen on 127.0.0.1:{port} (--host, --port or BENTOML_PORT): "
        "Address already in use\n"
    )
    monkeypatch.setenv("VISIONSERVE_GRPC_PORT", str(port))  # free again now: gRPC on it, HTTP elsewhere
    assert listening.main(["--host", "127.0.0.1", "--port", str(free_port())]) == 0
    monkeypatch.setenv("VISIONSERVE_MAX_QUEUE", "many")
    assert listening.main(["--port", str(free_port())]) == 1
    assert "VISIONSERVE_MAX_QUEUE='many' is not a valid int" in capsys.readouterr().err
