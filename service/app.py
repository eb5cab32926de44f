"""The service's Starlette app (mounted into BentoML by service.service): both route sets and the JSON errors.

Routes: POST /classify, POST /classify_batch, GET /metadata (service.classify_routes), the Open Inference
Protocol's /v2 routes (service.oip) and Triton's model repository extension (service.repository_routes), mounted by
`attach` once the models are loaded (service.repository). BentoML adds /livez, /readyz
and /metrics around them. Every refusal is `{"error": message, "code": code}` with a code of service.errors, a path
that no route has included (FallbackRoute). The API-key check and CORS are ASGI middleware (`asgi_middlewares`)
that service.service adds to BentoML's app, so that they cover BentoML's routes too.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import classify_routes, oip, repository_routes
from service.auth import AccessControl, ApiKeyMiddleware
from service.classifier import Classifier
from service.connections import ConnectionRebalancing
from service.errors import ApiError
from service.metrics import service_metrics
from service.repository import ModelRepository, as_repository
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# Starlette's own refusals by status; any other status is `http_error`.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


class FallbackRoute(BaseRoute):
    """Every path, matched only partially: the JSON 404 for a path that nothing else has.

    A full match anywhere wins over a partial one, in this app's router and in BentoML's, which lists its API page
    (/) and schema (/docs.json) after this mounted app; so this route takes only what no route has. It must stay
    last here, behind any route that can partially match (a wrong method's 405).
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        return (Match.PARTIAL, {}) if scope["type"] == "http" else (Match.NONE, {})

    def url_path_for(self, name: str, /, **path_params: Any):
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise ApiError("not_found", f"no route for {scope['method']} {scope['path']}")


def create_app() -> Starlette:
    """The app with the service's own routes; they answer 503 not_ready until `attach` gives them the models."""
    return Starlette(
        routes=[*classify_routes.routes(), FallbackRoute()],
        exception_handlers={
            ApiError: render_api_error,
            HTTPException: render_http_error,
            Exception: render_internal_error,
        },
    )


def attach(app: Starlette, served: ModelRepository | Classifier, access: AccessControl | None = None) -> None:
    """Give the routes their models (one classifier is a repository of one model) and mount the Open Inference
    Protocol (/v2) and repository routes before the fallback. `access`: whose keys may load and unload models
    (by default nobody's)."""
    repository = as_repository(served)
    app.state.repository = repository
    routes = app.router.routes
    fallback = [route for route in routes if isinstance(route, FallbackRoute)]
    mounted = oip.routes(repository) + repository_routes.routes(repository, access or AccessControl())
    routes[:] = [route for route in routes if not isinstance(route, FallbackRoute)] + mounted + fallback


class JsonErrors:
    """ASGI middleware: an error answered in anything but JSON (BentoML's own routes answer a wrong method with
    Starlette's plain-text 405, CORS a refused preflight with plain text) becomes the service's `{"error", "code"}`,
    with the same status and headers, so that every error a client gets is JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}  # the response start of a non-JSON error, while its body is collected

        async def send_json_errors(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and not _is_json(message["headers"]):
                    held["start"], held["body"] = message, b""
                    return
            elif held and message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["start"]["status"]
                detail = held["body"].decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
                body = json.dumps({"error": detail, "code": HTTP_ERROR_CODES.get(status, "http_error")}).encode()
                headers = [
                    (k, v) for k, v in held["start"]["headers"] if k.lower() not in (b"content-type", b"content-length")
                ]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({**held["start"], "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_json_errors)


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


def asgi_middlewares(settings: ServiceSettings, access: AccessControl) -> list[tuple[type, dict[str, Any]]]:
    """(class, options) of the ASGI middleware around BentoML's whole app, outermost first.

    JSON errors are outermost, so that every refusal inside, BentoML's and CORS's too, reaches the client as JSON.
    With several workers, connection rebalancing next (it only adds a header to the answer, whatever it is).
    CORS is outside the key check, so that a browser's preflight needs no key and a 401 carries the CORS headers
    (without them the page could not read it).
    """
    middlewares: list[tuple[type, dict[str, Any]]] = [(JsonErrors, {})]
    if settings.workers > 1 and settings.rebalance_every:
        middlewares.append((ConnectionRebalancing, {"workers": settings.workers, "every": settings.rebalance_every}))
    if settings.cors_origin_list:
        middlewares.append(
            (
                CORSMiddleware,
                {
                    "allow_origins": settings.cors_origin_list,
                    "allow_methods": ["GET", "POST"],
                    "allow_headers": ["Authorization", "Content-Type", oip.HEADER_LENGTH],
                    "expose_headers": ["Retry-After", "WWW-Authenticate", oip.HEADER_LENGTH],
                },
            )
        )
    if access.enabled:
        middlewares.append((ApiKeyMiddleware, {"access": access}))
    return middlewares


def with_middlewares(app: ASGIApp, middlewares: list[tuple[type, dict[str, Any]]]) -> ASGIApp:
    """`app` inside `middlewares` (outermost first), as BentoML stacks them: for the app without BentoML (tests)."""
    for cls, options in reversed(middlewares):
        app = cls(app, **options)
    return app


async def render_api_error(request: Request, exc: ApiError) -> JSONResponse:
    service_metrics().rejected_requests.labels(reason=exc.code).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def render_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (a route's wrong method: 405) as JSON like every other error."""
    code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    service_metrics().rejected_requests.labels(reason=code).inc()
    return JSONResponse({"error": exc.detail, "code": code}, status_code=exc.status_code, headers=exc.headers)


async def render_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    service_metrics().rejected_requests.labels(reason="internal").inc()
    return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)
