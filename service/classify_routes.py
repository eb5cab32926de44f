"""The service's own routes: POST /classify, POST /classify_batch and GET /metadata.

They find the ModelRepository in `request.app.state.repository` (service.app.attach puts it there) and the model in
the query's `model` and `version` (for /classify also the JSON body's or the form's fields); with one model served
both are optional. They raise ApiError for every refusal (service.app renders it as JSON), and check in the order of
service.request_reading, then per image the pixel count from the header (413) and the decode (400/415). A request
holds a lease on its model version from admission to answer (service.repository), so a rollout never cuts it off.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service.classifier import Classifier
from service.errors import ApiError
from service.multipart import FilePart
from service.repository import Lease, ModelRepository, summaries
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

# A raw body's type: each format inference.imaging accepts (MPO travels as image/jpeg), or octet-stream, as generic
# clients send bytes; the decoder reads the format from the bytes whichever is declared.
RAW_IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/avif", "image/heic", "image/heif", "application/octet-stream"}
)
JSON_TYPE = "application/json"
JSON_FIELDS = frozenset({"image", "top_k", "model", "version"})
# JSON bodies up to this size are parsed on the event loop: cheaper there than a hop to a thread.
INLINE_PARSE_MAX_BYTES = 64 * 1024


def routes() -> list[Route]:
    return [
        Route("/classify", classify, methods=["POST"]),
        Route("/classify_batch", classify_batch, methods=["POST"]),
        Route("/metadata", metadata, methods=["GET"]),
    ]


@dataclass(frozen=True)
class ModelChoice:
    """The model (and version) a request names; None = the only model served (and its default version)."""

    model: str | None = None
    version: str | None = None

    @classmethod
    def of(cls, model: Any, version: Any, where: str) -> ModelChoice:
        for field, value in (("model", model), ("version", version)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ApiError("invalid_model_choice", f"`{field}` in {where} must be a non-empty string")
        return cls(model, version)

    def merged(self, body: ModelChoice) -> ModelChoice:
        """The query's choice completed by the body's; the two naming different models or versions is a 400."""
        for field in ("model", "version"):
            mine, theirs = getattr(self, field), getattr(body, field)
            if mine is not None and theirs is not None and mine != theirs:
                raise ApiError(
                    "invalid_model_choice", f"the query names {field} {mine!r} and the body {field} {theirs!r}"
                )
        return ModelChoice(self.model or body.model, self.version or body.version)


def attached_repository(request: Request) -> ModelRepository:
    repository = getattr(request.app.state, "repository", None)
    if repository is None:
        raise ApiError("not_ready", "the model is still loading or warming up", {"Retry-After": "1"})
    return repository


def query_choice(request: Request) -> ModelChoice:
    return ModelChoice.of(request.query_params.get("model"), request.query_params.get("version"), "the query")


async def classify(request: Request) -> JSONResponse:
    """One image: multipart field `image`, a raw image body, or JSON {"image": base64, "top_k": k}.

    The model is picked, and the request admitted, before the body is read when the query names it (or one model
    is served); a model named only in the body is admitted once the body is read.
    """
    repository = attached_repository(request)
    settings = repository.settings
    deadline = settings.request_deadline()
    query = query_choice(request)
    query_top_k = request.query_params.get("top_k")
    lease: Lease | None = None
    try:
        if query.model is not None or len(repository.models()) == 1:
            lease = repository.lease(query.model, query.version)
            await admit_when_warm(lease.classifier)
            if query_top_k is not None:
                lease.classifier.check_top_k(query_top_k)  # fail before reading the body
        data, body_choice, body_top_k = await read_classify_body(request, repository, lease, deadline)
        choice = query.merged(body_choice)
        if lease is None or choice != query:
            chosen = repository.lease(choice.model, choice.version)
            if lease is not None:
                lease.release()
            lease = chosen
            await admit_when_warm(lease.classifier)
            if query_top_k is not None:
                lease.classifier.check_top_k(query_top_k)
        classifier = lease.classifier
        top_k = pick_top_k(classifier, body_top_k, query_top_k)
        [pixels] = await classifier.decode_many([data])
        if isinstance(pixels, ApiError):
            raise pixels
        probabilities = await classifier.infer(pixels[None], deadline=deadline)
    finally:
        if lease is not None:
            lease.release()
    return JSONResponse(
        {
            "model": classifier.package.name,
            "version": classifier.package.version,
            "predictions": classifier.top_k(probabilities[0], top_k),
        }
    )


async def read_classify_body(
    request: Request, repository: ModelRepository, lease: Lease | None, deadline: float
) -> tuple[bytes, ModelChoice, Any]:
    """(image bytes, the body's model choice, the body's top_k or None) of a /classify request, its body all
    arrived by `deadline`."""
    media_type = media_type_of(request)
    max_bytes = repository.settings.max_body_bytes
    if media_type == MULTIPART:
        form = await read_form(request, max_bytes, repository.uploads, deadline, max_files=1)
        data = form_image(form, "image")
        # An empty field is how an HTML form (the API page's too) sends one left blank: not a choice.
        choice = ModelChoice.of(form.get("model") or None, form.get("version") or None, "the form")
        return data, choice, form.get("top_k")
    if media_type in RAW_IMAGE_TYPES:
        return await read_body(request, max_bytes, repository.uploads, deadline), ModelChoice(), None
    if media_type == JSON_TYPE:
        body = await read_body(request, max_bytes, repository.uploads, deadline)
        if len(body) <= INLINE_PARSE_MAX_BYTES:
            return parse_json_image(body)
        # base64 of a big image would hold up every other request on the event loop
        if lease is not None:
            return await lease.classifier.run_in_pool(parse_json_image, body)
        return await asyncio.to_thread(parse_json_image, body)
    raise unsupported_media_type(media_type, [MULTIPART, *sorted(RAW_IMAGE_TYPES), JSON_TYPE])


async def classify_batch(request: Request) -> JSONResponse:
    """Many images (multipart field `images`, repeated): one result per image, in order; bad images fail alone."""
    repository = attached_repository(request)
    query = query_choice(request)
    with repository.lease(query.model, query.version) as classifier:
        return await classify_many(request, await admit_when_warm(classifier), repository)


async def classify_many(request: Request, classifier: Classifier, repository: ModelRepository) -> JSONResponse:
    deadline = classifier.settings.request_deadline()
    query_top_k = request.query_params.get("top_k")
    if query_top_k is not None:
        classifier.check_top_k(query_top_k)
    media_type = media_type_of(request)
    if media_type != MULTIPART:
        raise unsupported_media_type(media_type, [MULTIPART])
    settings = classifier.settings
    form = await read_form(
        request, settings.max_body_bytes, repository.uploads, deadline, max_files=settings.max_batch_images
    )
    uploads = form.getlist("images")
    if not uploads:
        raise ApiError("no_images", "send at least one image in the multipart field 'images'")
    if not all(isinstance(u, FilePart) for u in uploads):
        raise ApiError("invalid_multipart", "every 'images' part must be a file upload (with a filename)")
    top_k = pick_top_k(classifier, form.get("top_k"), query_top_k)
    decoded = await classifier.decode_many([u.data for u in uploads])
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
    """The named (or only) model's metadata, plus `models` (one line per loaded version of every model) and
    `workers` (how many worker processes serve, and why). With several models served and none named, only those."""
    repository = attached_repository(request)
    query = query_choice(request)
    models = summaries(repository)
    service = {"models": models, "workers": repository.workers}
    if query == ModelChoice() and len(repository.models()) != 1:
        return JSONResponse(service)
    return JSONResponse({**repository.get(query.model, query.version).metadata(), **service})


def pick_top_k(classifier: Classifier, body_top_k: Any, query_top_k: str | None) -> int:
    """top_k from the body (form field or JSON) if given, else the query, else the default (5, or fewer classes)."""
    value = body_top_k if body_top_k is not None else query_top_k
    return classifier.default_top_k if value is None else classifier.check_top_k(value)


def parse_json_image(body: bytes) -> tuple[bytes, ModelChoice, Any]:
    """A JSON body {"image": "<base64>", "top_k": k, "model": name, "version": v} -> (image bytes, the model
    choice, top_k or None); refuses anything else."""
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
    choice = ModelChoice.of(document.get("model"), document.get("version"), "the JSON body")
    return decode_base64(image), choice, document.get("top_k")
