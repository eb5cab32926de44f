"""The service's HTTP routes (a Starlette app mounted into BentoML): request parsing, limits and JSON errors.

Routes: POST /classify, POST /classify_batch, GET /metadata, plus the Open Inference Protocol routes of
`service.oip` (mounted by `attach`). BentoML adds /livez, /readyz and /metrics around them.

Limits, in the order they are checked: readiness (503), content type (415; pickle is always refused), the
declared Content-Length (413 before any byte of the body is read), the streamed body size (413 as soon as a
chunked body passes the limit), then per image the pixel count from the header (413) and the decode (400/415).
No URL is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.classifier import Classifier
from service.errors import ApiError
from service.metrics import service_metrics

log = logging.getLogger(__name__)

RAW_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
MULTIPART = "multipart/form-data"
JSON_TYPE = "application/json"
JSON_FIELDS = frozenset({"image", "top_k"})
INLINE_PARSE_MAX_BYTES = 64 * 1024  # smaller JSON bodies are parsed on the event loop (microseconds)
MAX_FORM_FIELDS = 8  # non-file fields (top_k); more is not a real client
DATA_URL_PREFIX = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def create_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/classify", classify, methods=["POST"]),
            Route("/classify_batch", classify_batch, methods=["POST"]),
            Route("/metadata", metadata, methods=["GET"]),
        ],
        exception_handlers={
            ApiError: render_api_error,
            HTTPException: render_http_error,
            Exception: render_internal_error,
        },
    )


def attach(app: Starlette, classifier: Classifier) -> None:
    """Give the routes their classifier and mount the Open Inference Protocol (/v2) routes."""
    from service import oip  # imported here: oip builds on this module's body reading

    app.state.classifier = classifier
    app.router.routes.extend(oip.routes(classifier))


async def render_api_error(request: Request, exc: ApiError) -> JSONResponse:
    service_metrics().rejected_requests.labels(reason=exc.code).inc()
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def render_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (a route's wrong method: 405) as JSON like every other error. (A path that no route
    has is answered by BentoML's server before it reaches this app: a plain-text 404.)"""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    service_metrics().rejected_requests.labels(reason=code).inc()
    return JSONResponse({"error": exc.detail, "code": code}, status_code=exc.status_code, headers=exc.headers)


async def render_internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    service_metrics().rejected_requests.labels(reason="internal").inc()
    return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)


def classifier_of(request: Request) -> Classifier:
    classifier: Classifier | None = getattr(request.app.state, "classifier", None)
    if classifier is None or not classifier.ready:
        raise ApiError(503, "not_ready", "the model is still loading or warming up", {"Retry-After": "1"})
    classifier.batcher.admit()  # refuse at once under overload, before reading the body
    return classifier


async def classify(request: Request) -> JSONResponse:
    """One image: multipart field `image`, a raw image body, or JSON {"image": base64, "top_k": k}."""
    classifier = classifier_of(request)
    deadline = asyncio.get_running_loop().time() + classifier.settings.request_timeout_s
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        classifier.check_top_k(query_top_k)  # fail before reading the body
    media_type = media_type_of(request)
    if media_type == MULTIPART:
        form = await read_form(request, classifier, max_files=1)
        data = await form_image(form, "image")
        body_top_k = form.get("top_k")
    elif media_type in RAW_IMAGE_TYPES:
        data = await read_body(request, classifier.settings.max_body_bytes)
        body_top_k = None
    elif media_type == JSON_TYPE:
        body = await read_body(request, classifier.settings.max_body_bytes)
        if len(body) <= INLINE_PARSE_MAX_BYTES:
            data, body_top_k = parse_json_image(body)
        else:  # JSON + base64 of a big image: milliseconds of CPU, off the event loop
            data, body_top_k = await classifier.run_in_pool(parse_json_image, body)
    else:
        raise unsupported_media_type(media_type, [MULTIPART, *sorted(RAW_IMAGE_TYPES), JSON_TYPE])
    top_k = pick_top_k(classifier, body_top_k, query_top_k)
    [pixels] = await classifier.decode_many([data])
    if isinstance(pixels, ApiError):
        raise pixels
    probabilities = await classifier.infer(pixels[None], deadline=deadline)
    return JSONResponse(
        {
            "model": classifier.package.name,
            "version": classifier.package.version,
            "predictions": classifier.top_k(probabilities[0], top_k),
        }
    )


async def classify_batch(request: Request) -> JSONResponse:
    """Many images (multipart field `images`, repeated): one result per image, in order; bad images fail alone."""
    classifier = classifier_of(request)
    deadline = asyncio.get_running_loop().time() + classifier.settings.request_timeout_s
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        classifier.check_top_k(query_top_k)
    media_type = media_type_of(request)
    if media_type != MULTIPART:
        raise unsupported_media_type(media_type, [MULTIPART])
    form = await read_form(request, classifier, max_files=classifier.settings.max_batch_images)
    uploads = form.getlist("images")
    if not uploads:
        raise ApiError(400, "no_images", "send at least one image in the multipart field 'images'")
    if not all(isinstance(u, UploadFile) for u in uploads):
        raise ApiError(400, "invalid_multipart", "every 'images' part must be a file upload (with a filename)")
    top_k = pick_top_k(classifier, form.get("top_k"), query_top_k)
    decoded = await classifier.decode_many([await u.read() for u in uploads])
    good = [i for i, pixels in enumerate(decoded) if not isinstance(pixels, ApiError)]
    results: list[dict[str, Any]] = [{"index": i, "filename": u.filename} for i, u in enumerate(uploads)]
    if good:
        probabilities = await classifier.infer(np.stack([decoded[i] for i in good]), deadline=deadline)
        for row, i in zip(probabilities, good, strict=True):
            results[i]["predictions"] = classifier.top_k(row, top_k)
    for i, outcome in enumerate(decoded):
        if isinstance(outcome, ApiError):
            results[i]["error"] = {"code": outcome.code, "message": outcome.message}
    return JSONResponse(
        {
            "model": classifier.package.name,
            "version": classifier.package.version,
            "results": results,
        }
    )


async def metadata(request: Request) -> JSONResponse:
    classifier: Classifier | None = getattr(request.app.state, "classifier", None)
    if classifier is None:
        raise ApiError(503, "not_ready", "the model is still loading", {"Retry-After": "1"})
    return JSONResponse(classifier.metadata())


def media_type_of(request: Request) -> str:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if "pickle" in media_type:
        raise ApiError(415, "pickle_refused", "pickled bodies are never accepted (unpickling runs code)")
    return media_type


def unsupported_media_type(media_type: str, accepted: list[str]) -> ApiError:
    return ApiError(
        415,
        "unsupported_media_type",
        f"content type {media_type or '(none)'!r} is not accepted here; send one of {', '.join(accepted)}",
    )


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing (413) a declared or streamed size over `max_bytes` without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "invalid_content_length", f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise body_too_large(max_bytes)
    chunks = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:  # a chunked body (or one longer than declared)
                raise body_too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection mid-body") from None
    return b"".join(chunks)


def body_too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is larger than the limit of {max_bytes} bytes")


async def read_form(request: Request, classifier: Classifier, max_files: int) -> FormData:
    body = await read_body(request, classifier.settings.max_body_bytes)

    async def chunks():
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=max_files, max_fields=MAX_FORM_FIELDS)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise ApiError(
                400, "too_many_images", f"too many images in one request; the limit is {max_files}"
            ) from None
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None


async def form_image(form: FormData, field: str) -> bytes:
    upload = form.get(field)
    if upload is None:
        raise ApiError(400, "missing_image", f"send the image as a file in the multipart field {field!r}")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "invalid_multipart", f"the multipart field {field!r} must be a file upload")
    return await upload.read()


def pick_top_k(classifier: Classifier, body_top_k: Any, query_top_k: str | None) -> int:
    """top_k from the body (form field or JSON) if given, else the query, else the default (5, or fewer classes)."""
    value = body_top_k if body_top_k is not None else query_top_k
    return classifier.default_top_k if value is None else classifier.check_top_k(value)


def parse_json_image(body: bytes) -> tuple[bytes, Any]:
    """A JSON body {"image": "<base64>", "top_k": k} -> (image bytes, top_k or None); refuses anything else."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "invalid_json", 'the body must be a JSON object: {"image": "<base64>", "top_k": 5}')
    if "url" in document:
        raise ApiError(
            400,
            "url_not_supported",
            "the server never fetches URLs; send the image bytes as base64",
        )
    unknown = set(document) - JSON_FIELDS
    if unknown:
        raise ApiError(
            400,
            "invalid_json",
            f"unknown fields {sorted(unknown)}; accepted: {sorted(JSON_FIELDS)}",
        )
    image = document.get("image")
    if not isinstance(image, str):
        raise ApiError(
            400,
            "missing_image",
            'the JSON body needs "image": a base64 string of the encoded image',
        )
    return decode_base64(image), document.get("top_k")


def decode_base64(text: str) -> bytes:
    """Standard base64 (an optional data: URL prefix is dropped); the length is checked before decoding."""
    text = DATA_URL_PREFIX.sub("", text, count=1)
    if len(text) % 4:
        raise ApiError(400, "invalid_base64", f"base64 length {len(text)} is not a multiple of 4")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ApiError(400, "invalid_base64", f"the image is not valid base64: {exc}") from None
