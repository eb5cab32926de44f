"""The OpenAPI description of every route of service.app, built from the real contract so that it cannot drift: the
codes and meanings of service.errors, the limits of the settings, the package's classes and input size.

BentoML's API page (/) and schema (/docs.json) merge the paths of a mounted FastAPI app only (BentoML 1.4's
_bentoml_sdk/service/openapi.py, generate_spec), and the service's routes are plain Starlette: FastAPI's
per-request work would cost event-loop time on every prediction. So `schema_app` is a FastAPI app that only carries
these operations. service.service mounts it behind the service's app, whose fallback route answers every path
first, so no request reaches it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.requests import Request
from starlette.responses import JSONResponse

from inference.imaging import encode_png
from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES, ModelPackage
from service import oip
from service.auth import AccessControl
from service.classify_routes import RAW_IMAGE_TYPES
from service.errors import ERRORS
from service.settings import ServiceSettings
from service.statistics import InferenceStatistics

TAG_CLASSIFY = "Classification"
TAG_V2 = "Open Inference Protocol (v2)"
TAG_REPOSITORY = "Model repository (Triton's extension)"
SECURITY_SCHEME = "apiKey"

# The codes of each step of a request, in the order service.request_reading checks them.
ADMISSION = ("not_ready", "queue_full")
BODY = (
    "pickle_refused",
    "unsupported_content_encoding",
    "invalid_content_length",
    "body_too_large",
    "too_many_uploads",
    "client_disconnected",
    "body_timeout",
    "invalid_content_encoding",
)
IMAGE = ("empty", "corrupt", "unsupported_format", "image_too_large")  # the decoder's (inference.imaging)
ANSWER = ("deadline_exceeded", "shutting_down")
MODEL = ("model_not_found", "version_not_found")
CHOICE = ("invalid_model_choice", *MODEL)  # a model named in the query or body, or none while several are served
# Refusals of no operation in particular (the routing's, and a request head's, service.http_protocol): the "default"
# response of every operation.
ROUTING = (
    "method_not_allowed",
    "not_found",
    "http_error",
    "invalid_http",
    "request_head_timeout",
    "request_head_too_large",
)

CLASSIFY_CODES = (
    *CHOICE,
    *ADMISSION,
    "invalid_top_k",
    *BODY,
    "unsupported_media_type",
    "invalid_multipart",
    "too_many_images",
    "missing_image",
    "invalid_json",
    "url_not_supported",
    "invalid_base64",
    *IMAGE,
    *ANSWER,
)
CLASSIFY_BATCH_CODES = (
    *CHOICE,
    *ADMISSION,
    "invalid_top_k",
    *BODY,
    "unsupported_media_type",
    "invalid_multipart",
    "too_many_images",
    "no_images",
    *ANSWER,
)
INFER_CODES = (
    *MODEL,
    *ADMISSION,
    *BODY,
    "invalid_json",
    "invalid_request",
    "empty_batch",
    "too_many_images",
    "invalid_base64",
    *IMAGE,
    *ANSWER,
)
# A repository call's small JSON body (service.repository_routes): under the upload budget's small-body size, which
# it always admits, so never too_many_uploads.
REPOSITORY_BODY = (*(code for code in BODY if code != "too_many_uploads"), "invalid_json")
LOAD_CODES = (
    "unauthorized",
    *REPOSITORY_BODY,
    "invalid_request",
    "invalid_model_name",
    *MODEL,
    "load_in_progress",
    "package_invalid",
    "model_load_failed",
)
UNLOAD_CODES = ("unauthorized", *REPOSITORY_BODY, "invalid_request", "invalid_model_name", *MODEL, "load_in_progress")


@dataclass(frozen=True)
class Contract:
    """What the description is built from: the served package, the settings and who needs a key."""

    settings: ServiceSettings
    model_name: str
    model_version: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W)
    backend: str
    access: AccessControl
    models: tuple[str, ...] = ()  # every model served at start-up; the examples are the first one's

    @classmethod
    def of(
        cls, settings: ServiceSettings, package: ModelPackage, access: AccessControl, models: list[str] | None = None
    ) -> Contract:
        spec = package.spec
        return cls(
            settings,
            package.name,
            package.version,
            tuple(spec.class_names),
            tuple(spec.input_size),
            settings.backend,
            access,
            tuple(dict.fromkeys(models or [package.name])),
        )

    @property
    def default_top_k(self) -> int:
        return min(5, len(self.class_names))


def error_schema(codes: Iterable[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error", "code"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong, for people"},
            "code": {"type": "string", "enum": list(codes), "description": "the reason, stable, for programs"},
        },
    }


def error_content(codes: list[str]) -> dict[str, Any]:
    return {
        "application/json": {
            "schema": error_schema(codes),
            "examples": {
                code: {"summary": ERRORS[code].meaning, "value": {"error": ERRORS[code].meaning, "code": code}}
                for code in codes
            },
        }
    }


def error_responses(codes: Iterable[str]) -> dict[str, Any]:
    """The responses of `codes` (and `internal`), one per status, each listing its codes and what they mean."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys([*codes, "internal"]):
        by_status.setdefault(ERRORS[code].status, []).append(code)
    responses: dict[str, Any] = {}
    for status, status_codes in sorted(by_status.items()):
        response: dict[str, Any] = {
            "description": "; ".join(f"`{code}`: {ERRORS[code].meaning}" for code in status_codes),
            "content": error_content(status_codes),
        }
        if status == 503:
            response["headers"] = {
                "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
            }
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "example": "Bearer"}}}
        responses[str(status)] = response
    responses["default"] = {
        "description": "Any other refusal, the same JSON: "
        + "; ".join(f"`{code}` ({ERRORS[code].status or 'its status'}): {ERRORS[code].meaning}" for code in ROUTING),
        "content": {"application/json": {"schema": error_schema(ROUTING)}},
    }
    return responses


def json_response(description: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


def operation(
    contract: Contract,
    path: str,
    tag: str,
    summary: str,
    description: str,
    codes: Iterable[str],
    responses: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """One OpenAPI operation; a route that wants an API key also lists `unauthorized`."""
    codes = list(codes)
    if contract.access.requires_key(path) and "unauthorized" not in codes:
        codes.insert(0, "unauthorized")
    return {
        "tags": [tag],
        "summary": summary,
        "description": description,
        **fields,
        "responses": {**responses, **error_responses(codes)},
    }


def example_image() -> bytes:
    """A small PNG for the examples: enough to try a route from the page."""
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    return encode_png(pixels)


def top_k_schema(contract: Contract) -> dict[str, Any]:
    return {"type": "integer", "minimum": 1, "maximum": len(contract.class_names), "default": contract.default_top_k}


def predictions_schema(contract: Contract) -> dict[str, Any]:
    return {
        "type": "array",
        "description": "the top_k most likely classes, most likely first",
        "items": {
            "type": "object",
            "required": ["label", "index", "probability"],
            "properties": {
                "label": {"type": "string", "description": "the class name (GET /metadata lists them)"},
                "index": {"type": "integer", "minimum": 0, "maximum": len(contract.class_names) - 1},
                "probability": {"type": "number", "format": "float", "minimum": 0, "maximum": 1},
            },
        },
    }


def example_predictions(contract: Contract) -> list[dict[str, Any]]:
    shares = (0.9, 0.06, 0.03)
    return [
        {"label": label, "index": index, "probability": share}
        for index, (label, share) in enumerate(zip(contract.class_names, shares, strict=False))
    ]


def limits_text(contract: Contract) -> str:
    settings = contract.settings
    return (
        f"Limits: a body of at most {settings.max_body_bytes} bytes (VISIONSERVE_MAX_BODY_BYTES), an image of at most "
        f"{settings.max_image_pixels} pixels (VISIONSERVE_MAX_IMAGE_PIXELS), an answer within "
        f"{settings.request_timeout_s:g} s of arrival (VISIONSERVE_REQUEST_TIMEOUT_S). The image is scaled and "
        f"centre-cropped to the model's {contract.input_size[1]}x{contract.input_size[0]}."
    )


def model_choice_parameters(contract: Contract, body_too: bool) -> list[dict[str, Any]]:
    """The query's `model` and `version`: optional while one model is served."""
    served = ", ".join(f"`{name}`" for name in contract.models)
    also = " (or the body's `model` field; the two must agree)" if body_too else ""
    return [
        {
            "name": "model",
            "in": "query",
            "required": False,
            "description": f"the model to use{also}; optional when the server serves one model. At start-up: {served}",
            "schema": {"type": "string"},
            "example": contract.model_name,
        },
        {
            "name": "version",
            "in": "query",
            "required": False,
            "description": "the model's version; by default its default version (the one loaded last)",
            "schema": {"type": "string"},
        },
    ]


def classify_operations(contract: Contract) -> dict[str, dict[str, Any]]:
    settings = contract.settings
    top_k = top_k_schema(contract)
    top_k_query = {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": "how many classes to answer (a top_k in the body wins)",
        "schema": top_k,
    }
    model_field = {"type": "string", "description": "the model to use (as the query's `model`)"}
    version_field = {"type": "string", "description": "the model's version (as the query's `version`)"}
    image_file = {"type": "string", "format": "binary", "description": "an encoded image"}
    raw_image = {"schema": {"type": "string", "format": "binary"}}
    model_fields = {
        "model": {"type": "string", "example": contract.model_name},
        "version": {"type": "string", "example": contract.model_version},
    }
    classify = operation(
        contract,
        "/classify",
        TAG_CLASSIFY,
        "Classify one image",
        "One image: a multipart upload (field `image`), a raw body (`Content-Type`: "
        + ", ".join(f"`{media_type}`" for media_type in sorted(RAW_IMAGE_TYPES))
        + '), or JSON `{"image": "<base64>", "top_k": 3}` (standard base64; a `data:` URL prefix is dropped; URLs '
        "are never fetched). The model is the query's `model` (or the body's), optional while one model is served; "
        "name it in the query so that the request is admitted before its body is read. " + limits_text(contract),
        CLASSIFY_CODES,
        {
            "200": json_response(
                "The most likely classes",
                {
                    "type": "object",
                    "required": ["model", "version", "predictions"],
                    "properties": {**model_fields, "predictions": predictions_schema(contract)},
                },
                {
                    "model": contract.model_name,
                    "version": contract.model_version,
                    "predictions": example_predictions(contract),
                },
            )
        },
        operationId="classify",
        parameters=[top_k_query, *model_choice_parameters(contract, body_too=True)],
        requestBody={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": image_file,
                            "top_k": top_k,
                            "model": model_field,
                            "version": version_field,
                        },
                    },
                    "encoding": {"image": {"contentType": ", ".join(sorted(RAW_IMAGE_TYPES))}},
                },
                **{media_type: raw_image for media_type in sorted(RAW_IMAGE_TYPES)},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "additionalProperties": False,
                        "properties": {
                            "image": {"type": "string", "format": "byte", "description": "the encoded image, base64"},
                            "top_k": top_k,
                            "model": model_field,
                            "version": version_field,
                        },
                    },
                    "example": {"image": base64.b64encode(example_image()).decode(), "top_k": 3},
                },
            },
        },
    )
    per_image_codes = list(IMAGE)
    classify_batch = operation(
        contract,
        "/classify_batch",
        TAG_CLASSIFY,
        "Classify many images",
        f"Up to {settings.max_batch_images} images (VISIONSERVE_MAX_BATCH_IMAGES) as repeated multipart fields "
        "`images`, answered in order. An image that cannot be decoded fails alone: its entry has "
        f"`error` ({', '.join(per_image_codes)}) and the request is still 200. " + limits_text(contract),
        CLASSIFY_BATCH_CODES,
        {
            "200": json_response(
                "One result per image, in order",
                {
                    "type": "object",
                    "required": ["model", "version", "results"],
                    "properties": {
                        **model_fields,
                        "results": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["index", "filename"],
                                "properties": {
                                    "index": {"type": "integer"},
                                    "filename": {"type": "string", "nullable": True},
                                    "predictions": predictions_schema(contract),
                                    "error": {
                                        "type": "object",
                                        "description": "instead of predictions, for an image that does not decode",
                                        "properties": {
                                            "code": {"type": "string", "enum": per_image_codes},
                                            "message": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                {
                    "model": contract.model_name,
                    "version": contract.model_version,
                    "results": [
                        {"index": 0, "filename": "cat.jpg", "predictions": example_predictions(contract)},
                        {
                            "index": 1,
                            "filename": "broken.jpg",
                            "error": {"code": "corrupt", "message": ERRORS["corrupt"].meaning},
                        },
                    ],
                },
            )
        },
        operationId="classify_batch",
        parameters=[top_k_query, *model_choice_parameters(contract, body_too=False)],
        requestBody={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {
                            "images": {"type": "array", "items": image_file, "maxItems": settings.max_batch_images},
                            "top_k": top_k,
                        },
                    },
                    "encoding": {"images": {"contentType": ", ".join(sorted(RAW_IMAGE_TYPES))}},
                }
            },
        },
    )
    metadata = operation(
        contract,
        "/metadata",
        TAG_CLASSIFY,
        "The model and the server's settings",
        "The model's name, version, classes and input; the served file's sha256; the backend, execution provider "
        "and device really in use (and why CUDA was not, if asked for); the batching settings and limits; the "
        "memory its loading took (`memory_bytes`: the worker's RSS growth while it loaded and warmed up). `models` "
        "lists every loaded version of every model. With several models served and none named, only `models`.",
        ("not_ready", *CHOICE),
        {
            "200": json_response(
                "The metadata",
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "arch": {"type": "string"},
                        "classes": {"type": "array", "items": {"type": "string"}},
                        "input": {"type": "object"},
                        "sha256": {"type": "string"},
                        "backend": {"type": "string"},
                        "execution_provider": {"type": "string"},
                        "device": {"type": "string"},
                        "batching": {"type": "object"},
                        "limits": {"type": "object"},
                        "ready": {"type": "boolean"},
                        "memory_bytes": {"type": "integer", "nullable": True},
                        "models": {"type": "array", "items": {"type": "object"}},
                    },
                },
            )
        },
        operationId="metadata",
        parameters=model_choice_parameters(contract, body_too=False),
    )
    return {
        "/classify": {"post": classify},
        "/classify_batch": {"post": classify_batch},
        "/metadata": {"get": metadata},
    }


def path_parameter(name: str, description: str, example: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
        "example": example,
    }


def v2_operations(contract: Contract) -> dict[str, dict[str, Any]]:
    settings = contract.settings
    height, width = contract.input_size
    num_classes = len(contract.class_names)
    name_parameter = path_parameter("name", "the model's name", contract.model_name)
    version_parameter = path_parameter("version", "the model's version", contract.model_version)
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    paths: dict[str, dict[str, Any]] = {}

    def add(path: str, method: str, summary: str, description: str, codes, responses, **fields) -> None:
        parameters = [name_parameter] if "{name}" in path else []
        if "{version}" in path:
            parameters.append(version_parameter)
        if parameters:
            fields["parameters"] = parameters + fields.get("parameters", [])
        operation_id = "v2" + path.removeprefix("/v2").replace("/", "_").replace("{", "").replace("}", "")
        paths.setdefault(path, {})[method] = operation(
            contract, path, TAG_V2, summary, description, codes, responses, operationId=operation_id, **fields
        )

    server = oip.server_metadata()
    for path in ("/v2", "/v2/"):
        add(
            path,
            "get",
            "Server metadata",
            "The server's name, version and protocol extensions.",
            (),
            {"200": json_response("The server metadata", {"type": "object"}, server)},
        )
    for kind in ("live", "ready"):
        add(
            f"/v2/health/{kind}",
            "get",
            f"Server {kind}",
            "200 for true, 400 for false, as the protocol and Triton answer (BentoML's /livez and /readyz answer 503).",
            (),
            {
                "200": json_response(f"{kind}: true", {"type": "object"}, {kind: True}),
                "400": json_response(f"{kind}: false", {"type": "object"}, {kind: False}),
            },
        )
    stats_example = {
        "model_stats": [InferenceStatistics(max_batch_size=1).model_stats(contract.model_name, contract.model_version)]
    }
    stats_description = (
        "Triton's statistics extension: requests that succeeded or failed, their queue and compute times (ns), "
        "images inferred and model calls, by batch size; summed over every worker process."
    )
    add(
        "/v2/models/stats",
        "get",
        "Statistics of every model",
        stats_description,
        (),
        {"200": json_response("The statistics", {"type": "object"}, stats_example)},
    )
    metadata_example = {
        "name": contract.model_name,
        "versions": [contract.model_version],
        "platform": oip.PLATFORMS[contract.backend],
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, height, width, 3]}],
        "outputs": [{"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, num_classes]}],
    }
    config_example = oip.model_config(
        contract.model_name, contract.input_size, num_classes, contract.backend, settings.device, settings
    )
    for path in (model, version):
        add(
            path,
            "get",
            "Model metadata",
            f"The model's input `{INPUT_NAME}` (UINT8 [N, H, W, 3]) and output `{OUTPUT_PROBABILITIES}` (FP32 "
            "[N, classes]); `parameters` adds the classes, the sha256 and the runtime in use.",
            MODEL,
            {"200": json_response("The model metadata", {"type": "object"}, metadata_example)},
        )
        add(
            f"{path}/ready",
            "get",
            "Model ready",
            "200 for true, 400 for false.",
            MODEL,
            {
                "200": json_response("ready", {"type": "object"}, {"name": contract.model_name, "ready": True}),
                "400": json_response("not ready", {"type": "object"}, {"name": contract.model_name, "ready": False}),
            },
        )
        add(
            f"{path}/config",
            "get",
            "Model configuration (Triton)",
            "Triton's model configuration extension: `max_batch_size` is the most images one request may carry "
            "(VISIONSERVE_MAX_BATCH_IMAGES), `max_queue_delay_microseconds` the batcher's wait "
            "(VISIONSERVE_MAX_LATENCY_MS); dims leave out the batch dimension.",
            MODEL,
            {"200": json_response("The model configuration", {"type": "object"}, config_example)},
        )
        add(
            f"{path}/stats",
            "get",
            "Model statistics (Triton)",
            stats_description,
            MODEL,
            {"200": json_response("The statistics", {"type": "object"}, stats_example)},
        )
        add(
            f"{path}/infer",
            "post",
            "Infer",
            f"One input tensor: `{INPUT_NAME}`, UINT8, shape [N, {height}, {width}, 3] (RGB, resized already), or "
            f"`{oip.BYTES_INPUT_NAME}`, BYTES, shape [N], encoded JPEG/PNG/WebP images (base64 strings in JSON); "
            f"N at most {settings.max_batch_images}. The output `{OUTPUT_PROBABILITIES}` is FP32 [N, {num_classes}]. "
            "Triton's binary tensor data extension is supported (tritonclient's default): the JSON, then the raw "
            f"bytes, with `{oip.HEADER_LENGTH}` giving the JSON's length. " + limits_text(contract),
            INFER_CODES,
            {
                "200": {
                    "description": "The probabilities (JSON, or JSON then binary data when asked with binary_data)",
                    "content": {
                        "application/json": {
                            "schema": {"type": "object"},
                            "example": {
                                "model_name": contract.model_name,
                                "model_version": contract.model_version,
                                "outputs": [
                                    {
                                        "name": OUTPUT_PROBABILITIES,
                                        "shape": [1, num_classes],
                                        "datatype": "FP32",
                                        "data": [round(1 / num_classes, 4)] * num_classes,
                                    }
                                ],
                            },
                        },
                        oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                    },
                }
            },
            parameters=[
                {
                    "name": oip.HEADER_LENGTH,
                    "in": "header",
                    "required": False,
                    "description": "binary tensor data extension: the bytes of JSON before the binary data",
                    "schema": {"type": "integer", "minimum": 1},
                }
            ],
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["inputs"],
                            "properties": {
                                "id": {"type": "string"},
                                "parameters": {"type": "object"},
                                "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "object"}},
                                "outputs": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                        "example": {
                            "inputs": [
                                {
                                    "name": oip.BYTES_INPUT_NAME,
                                    "datatype": "BYTES",
                                    "shape": [1],
                                    "data": [base64.b64encode(example_image()).decode()],
                                }
                            ]
                        },
                    },
                    oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                },
            },
        )
    return paths


def repository_operations(contract: Contract) -> dict[str, dict[str, Any]]:
    """Triton's model repository extension (service.repository_routes)."""
    name_parameter = path_parameter("name", "the model's name (its folder in the repository)", contract.model_name)
    version_body = {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "parameters": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"version": {"type": "string"}},
                        }
                    },
                },
                "example": {"parameters": {"version": contract.model_version}},
            }
        },
    }
    admin = "Wants an admin key (VISIONSERVE_ADMIN_KEYS_FILE; without it the route refuses every call). "
    index = operation(
        contract,
        "/v2/repository/index",
        TAG_REPOSITORY,
        "Repository index",
        "Every version in the repository or loaded: READY (serving), LOADING, or UNAVAILABLE with the reason (not "
        'loaded, unloaded, or why its load was refused). `{"ready": true}` lists only the READY ones.',
        (*REPOSITORY_BODY, "invalid_request"),
        {
            "200": json_response(
                "The versions",
                {"type": "array", "items": {"type": "object"}},
                [{"name": contract.model_name, "version": contract.model_version, "state": "READY", "reason": ""}],
            )
        },
        operationId="v2_repository_index",
        requestBody={
            "required": False,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                    "example": {"ready": True},
                }
            },
        },
    )
    load = operation(
        contract,
        "/v2/repository/models/{name}/load",
        TAG_REPOSITORY,
        "Load a model version and make it the default",
        admin + "Loads `parameters.version` (by default the highest in the repository): verifies its checksums, "
        "creates its runtime session and warms it up, then makes it the model's default at once; requests already "
        "admitted to the version it replaces finish there, and that version is unloaded when they are answered. A "
        "version that is missing, tampered with, or fails to load or warm up is refused and the version serving "
        "keeps serving. Answers once the version serves.",
        LOAD_CODES,
        {
            "200": json_response(
                "The version now serving",
                {"type": "object"},
                {
                    "name": contract.model_name,
                    "version": contract.model_version,
                    "state": "READY",
                    "memory_bytes": 10485760,
                    "memory_measure": "rss_delta_at_load",
                },
            )
        },
        operationId="v2_repository_models_name_load",
        parameters=[name_parameter],
        requestBody=version_body,
    )
    unload = operation(
        contract,
        "/v2/repository/models/{name}/unload",
        TAG_REPOSITORY,
        "Unload a model (or one version)",
        admin + "Stops serving `parameters.version`, or every version of the model; requests already admitted are "
        "answered first. The default moves to the highest version left.",
        UNLOAD_CODES,
        {
            "200": json_response(
                "What was unloaded",
                {"type": "object"},
                {"name": contract.model_name, "unloaded": ["1"], "default": "2"},
            )
        },
        operationId="v2_repository_models_name_unload",
        parameters=[name_parameter],
        requestBody=version_body,
    )
    return {
        "/v2/repository/index": {"post": index},
        "/v2/repository/models/{name}/load": {"post": load},
        "/v2/repository/models/{name}/unload": {"post": unload},
    }


def operations(contract: Contract) -> dict[str, dict[str, Any]]:
    """{path: {method: OpenAPI operation}} for every route of service.app."""
    return {**classify_operations(contract), **v2_operations(contract), **repository_operations(contract)}


async def _not_attached(request: Request) -> JSONResponse:
    # Reached only if the service's app lacks a documented route, i.e. before service.app.attach has run.
    return JSONResponse(
        {"error": "the model is still loading", "code": "not_ready"}, status_code=503, headers={"Retry-After": "1"}
    )


def wants_key(access: AccessControl, path: str) -> bool:
    """Whether the page's Authorize button applies: an API key, or an admin key where one can be given."""
    return access.requires_key(path) or (access.is_admin(path) and access.admin_keys is not None)


def schema_app(contract: Contract) -> FastAPI:
    """A FastAPI app whose routes carry `operations(contract)` into BentoML's schema; it serves nothing itself."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    # FastAPI's HTTPBearer puts the security scheme in the schema's components: the page's Authorize button.
    bearer = Depends(HTTPBearer(scheme_name=SECURITY_SCHEME, description="an API key", auto_error=False))
    for path, by_method in operations(contract).items():
        for method, spec in by_method.items():
            app.router.routes.append(
                APIRoute(
                    path,
                    _not_attached,
                    methods=[method.upper()],
                    openapi_extra=spec,
                    dependencies=[bearer] if wants_key(contract.access, path) else None,
                )
            )
    return app
