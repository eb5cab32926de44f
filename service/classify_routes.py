"""The service's own routes: POST /classify, POST /classify_batch and GET /metadata.

They find the Classifier in `request.app.state.classifier` (service.app.attach puts it there), raise ApiError for
every refusal (service.app renders it as JSON), and check in the order of service.request_reading, then per
image the pixel count from the header (413) and the decode (400/415).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.classifier import Classifier
from service.errors import ApiError
from service.request_reading import (
    MULTIPART,
    admit_when_warm,
    decode_base64,
    form_image,
    media_type_of,
    read_body,
    read_form,
    unsupported_media_type,
)

RAW_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp"})
JSON_TYPE = "application/json"
JSON_FIELDS = frozenset({"image", "top_k"})
# JSON bodies up to this size are parsed on the event loop: cheaper there than a hop to a thread.
INLINE_PARSE_MAX_BYTES = 64 * 1024


def routes() -> list[Route]:
    return [
        Route("/classify", classify, methods=["POST"]),
        Route("/classify_batch", classify_batch, methods=["POST"]),
        Route("/metadata", metadata, methods=["GET"]),
    ]


def attached_classifier(request: Request) -> Classifier | None:
    return getattr(request.app.state, "classifier", None)


async def classify(request: Request) -> JSONResponse:
    """One image: multipart field `image`, a raw image body, or JSON {"image": base64, "top_k": k}."""
    classifier = await admit_when_warm(attached_classifier(request))
    deadline = asyncio.get_running_loop().time() + classifier.settings.request_timeout_s
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        classifier.check_top_k(query_top_k)  # fail before reading the body
    media_type = media_type_of(request)
    max_bytes = classifier.settings.max_body_bytes
    if media_type == MULTIPART:
        form = await read_form(request, max_bytes, classifier.uploads, max_files=1)
        data = await form_image(form, "image")
        body_top_k = form.get("top_k")
    elif media_type in RAW_IMAGE_TYPES:
        data = await read_body(request, max_bytes, classifier.uploads)
        body_top_k = None
    elif media_type == JSON_TYPE:
        body = await read_body(request, max_bytes, classifier.uploads)
        if len(body) <= INLINE_PARSE_MAX_BYTES:
            data, body_top_k = parse_json_image(body)
        else:  # base64 of a big image would hold up every other request on the event loop
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
    classifier = await admit_when_warm(attached_classifier(request))
    deadline = asyncio.get_running_loop().time() + classifier.settings.request_timeout_s
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        classifier.check_top_k(query_top_k)
    media_type = media_type_of(request)
    if media_type != MULTIPART:
        raise unsupported_media_type(media_type, [MULTIPART])
    settings = classifier.settings
    form = await read_form(request, settings.max_body_bytes, classifier.uploads, max_files=settings.max_batch_images)
    uploads = form.getlist("images")
    if not uploads:
        raise ApiError("no_images", "send at least one image in the multipart field 'images'")
    if not all(isinstance(u, UploadFile) for u in uploads):
        raise ApiError("invalid_multipart", "every 'images' part must be a file upload (with a filename)")
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
    classifier = attached_classifier(request)
    if classifier is None:
        raise ApiError("not_ready", "the model is still loading", {"Retry-After": "1"})
    return JSONResponse(classifier.metadata())


def pick_top_k(classifier: Classifier, body_top_k: Any, query_top_k: str | None) -> int:
    """top_k from the body (form field or JSON) if given, else the query, else the default (5, or fewer classes)."""
    value = body_top_k if body_top_k is not None else query_top_k
    return classifier.default_top_k if value is None else classifier.check_top_k(value)


def parse_json_image(body: bytes) -> tuple[bytes, Any]:
    """A JSON body {"image": "<base64>", "top_k": k} -> (image bytes, top_k or None); refuses anything else."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ApiError("invalid_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict):
        raise ApiError("invalid_json", 'the body must be a JSON object: {"image": "<base64>", "top_k": 5}')
    if "url" in document:
        raise ApiError("url_not_supported", "the server never fetches URLs; send the image bytes as base64")
    unknown = set(document) - JSON_FIELDS
    if unknown:
        raise ApiError("invalid_json", f"unknown fields {sorted(unknown)}; accepted: {sorted(JSON_FIELDS)}")
    image = document.get("image")
    if not isinstance(image, str):
        raise ApiError("missing_image", 'the JSON body needs "image": a base64 string of the encoded image')
    return decode_base64(image), document.get("top_k")
