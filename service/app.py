"""The service's Starlette app (mounted into BentoML by service.service): both route sets and the JSON errors.

Routes: POST /classify, POST /classify_batch, GET /metadata (service.classify_routes), and the Open Inference
Protocol's /v2 routes (service.oip), mounted by `attach` once the Classifier exists. BentoML adds /livez, /readyz
and /metrics around them. Every refusal is `{"error": message, "code": code}` with a code of service.errors.
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from service import classify_routes, oip
from service.classifier import Classifier
from service.errors import ApiError
from service.metrics import service_metrics

log = logging.getLogger(__name__)

# Starlette's own refusals by status; any other status is `http_error`.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def create_app() -> Starlette:
    """The app with the service's own routes; they answer 503 not_ready until `attach` gives them a classifier."""
    return Starlette(
        routes=classify_routes.routes(),
        exception_handlers={
            ApiError: render_api_error,
            HTTPException: render_http_error,
            Exception: render_internal_error,
        },
    )


def attach(app: Starlette, classifier: Classifier) -> None:
    """Give the routes their classifier and mount the Open Inference Protocol (/v2) routes."""
    app.state.classifier = classifier
    app.router.routes.extend(oip.routes(classifier))


async def render_api_error(request: Request, exc: ApiError) -> JSONResponse:
    service_metrics().rejected_requests.labels(reason=exc.code).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def render_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (a route's wrong method: 405) as JSON like every other error. (A path that no route
    has is answered by BentoML's server before it reaches this app: a plain-text 404.)"""
    code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    service_metrics().rejected_requests.labels(reason=code).inc()
    return JSONResponse({"error": exc.detail, "code": code}, status_code=exc.status_code, headers=exc.headers)


async def render_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    service_metrics().rejected_requests.labels(reason="internal").inc()
    return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)
