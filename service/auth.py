"""API keys: hashed key files, the Bearer check for HTTP (a middleware) and for any other server, and a CLI to hash a key.

A key file holds one `sha256:<hex>` line per key (blank lines and # comments allowed), never a key in clear; make
a line with `python -m service.auth hash` (the key on stdin). A presented key is hashed and compared with every
stored hash by hmac.compare_digest, so neither the file nor the answer's timing tells a key. No key is ever logged
or echoed: not by the check, not in a message about a bad file line.

With VISIONSERVE_API_KEYS_FILE set, every route wants `Authorization: Bearer KEY` except BentoML's API page and
schema (they describe the API; the page's Authorize button takes a key) and, unless VISIONSERVE_AUTH_HEALTH=true,
the health routes and /metrics, which probes and scrapers call without one. VISIONSERVE_ADMIN_KEYS_FILE holds the
keys of the routes that load or unload models (POST /v2/repository/models/{name}/load and /unload): they want an
admin key instead of an API key, and refuse every call when no admin key file is set.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ApiError
from service.metrics import service_metrics
from service.settings import ENV_PREFIX, ServiceSettings, SettingsError

HASH_PREFIX = "sha256:"
HASH_LINE = re.compile(r"^sha256:([0-9a-f]{64})$")
# BentoML's own health routes and the v2 protocol's (Triton counts model readiness as health too).
HEALTH_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
MODEL_READY_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/ready$")
# The routes that change what is served: checked against the admin keys by the route itself.
ADMIN_PATH = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")
# BentoML's API page, its assets and its schemas: open, so that a browser can load the page and enter a key.
DOCS_PATHS = frozenset({"/", "/docs.json", "/schema.json"})
DOCS_PREFIXES = ("/static_content/", "/assets/")
CHALLENGE = "Bearer"  # the WWW-Authenticate header of every 401 (RFC 6750)


def hash_key(key: str) -> str:
    """The key file's line for `key`."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def read_key_hashes(path: str, variable: str) -> tuple[bytes, ...]:
    """The sha256 digests listed in the key file at `path`; SettingsError (naming `variable`) if it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"{variable}={path}: cannot read the key file ({reason})") from None
    digests = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = HASH_LINE.match(line)
        if match is None:  # the line itself is not shown: it may be a key pasted in clear
            raise SettingsError(
                f"{variable}={path}: line {number} is not a `sha256:<64 hex digits>` hash "
                "(make one with `python -m service.auth hash`)"
            )
        digests.append(bytes.fromhex(match.group(1)))
    if not digests:
        raise SettingsError(f"{variable}={path}: the key file holds no keys")
    return tuple(digests)


def matches_any(key: str, digests: tuple[bytes, ...]) -> bool:
    """Whether sha256(key) is one of `digests`; every digest is compared, in constant time, whichever matches."""
    presented = hashlib.sha256(key.encode()).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    return matched


def bearer_token(header_value: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header value (the scheme in any case), else None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(message: str) -> ApiError:
    return ApiError("unauthorized", message, {"WWW-Authenticate": CHALLENGE})


@dataclass(frozen=True)
class AccessControl:
    """Which requests need a key, and the check; from the settings' key files (read once, at start)."""

    api_keys: tuple[bytes, ...] | None = None  # None: no key needed
    admin_keys: tuple[bytes, ...] | None = None  # None: every admin call is refused
    protect_health: bool = False

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> AccessControl:
        return cls(
            api_keys=read_key_hashes(settings.api_keys_file, f"{ENV_PREFIX}API_KEYS_FILE")
            if settings.api_keys_file
            else None,
            admin_keys=read_key_hashes(settings.admin_keys_file, f"{ENV_PREFIX}ADMIN_KEYS_FILE")
            if settings.admin_keys_file
            else None,
            protect_health=settings.auth_health,
        )

    @property
    def enabled(self) -> bool:
        return self.api_keys is not None

    def is_health(self, path: str) -> bool:
        return path in HEALTH_PATHS or MODEL_READY_PATH.match(path) is not None

    @staticmethod
    def is_admin(path: str) -> bool:
        return ADMIN_PATH.match(path) is not None

    def requires_key(self, path: str) -> bool:
        """Whether a request for `path` needs an API key: all but the docs, (unless protected) health, and the admin
        routes, which want an admin key instead (check_admin)."""
        if not self.enabled or path in DOCS_PATHS or path.startswith(DOCS_PREFIXES) or self.is_admin(path):
            return False
        return self.protect_health or not self.is_health(path)

    def check(self, header_value: str | None) -> None:
        """Raise ApiError 401 unless the Authorization header value carries one of the API keys (or none is set)."""
        if self.api_keys is not None:
            _check(header_value, self.api_keys)

    def check_admin(self, header_value: str | None) -> None:
        """Raise ApiError 401 unless the header value carries an admin key; with no admin key file, always."""
        if self.admin_keys is None:
            raise unauthorized(f"admin routes are off: {ENV_PREFIX}ADMIN_KEYS_FILE is not set")
        _check(header_value, self.admin_keys)


def _check(header_value: str | None, digests: tuple[bytes, ...]) -> None:
    token = bearer_token(header_value)
    if token is None:
        raise unauthorized("an API key is required: send the header `Authorization: Bearer <key>`")
    if not matches_any(token, digests):
        raise unauthorized("the API key is not valid")


@functools.cache
def configured() -> AccessControl:
    """The access control of the settings in this process's environment, read once."""
    return AccessControl.from_settings(ServiceSettings.from_env())


def check_authorization(header_value: str | None) -> None:
    """For a server beside the HTTP routes (e.g. gRPC, with its `authorization` metadata): raise ApiError
    (401 unauthorized) unless the value is `Bearer KEY` with a key of VISIONSERVE_API_KEYS_FILE, if that is set."""
    configured().check(header_value)


def check_admin_authorization(header_value: str | None) -> None:
    """The check of routes that load or unload models: a key of VISIONSERVE_ADMIN_KEYS_FILE, else ApiError 401."""
    configured().check_admin(header_value)


class ApiKeyMiddleware:
    """Refuses, with the JSON 401, a request that needs a key and lacks a valid one, before any route sees it.

    Added to BentoML's app (service.service), so it covers BentoML's own routes too (/livez, /metrics).
    """

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.access.requires_key(scope["path"]):
            header_value = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                self.access.check(header_value)
            except ApiError as exc:
                service_metrics().rejected_requests.labels(reason=exc.code).inc()
                response = JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.auth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "hash",
        help="read one API key from stdin (first line) and print its key-file line, sha256:<hex>",
        description="Read one API key from stdin and print the line to add to VISIONSERVE_API_KEYS_FILE.",
    )
    parser.parse_args(argv)
    key = sys.stdin.readline().strip()  # as the Bearer check strips the header's token
    if not key:
        print("no key on stdin", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
