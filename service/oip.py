"""The Open Inference Protocol (KServe v2) over REST: health, metadata and infer routes over every served model.

Each model and loaded version has its routes (`/v2/models/{name}[/versions/{version}]/...`; without a version, the
model's default); an unknown one is a 404 naming what is served. The models come from service.repository.

Spec: https://github.com/kserve/open-inference-protocol (specification/protocol/inference_rest.md).

The model takes exactly one input tensor, either of:
- `pixels`: UINT8, shape [N, H, W, 3] (the model's H, W), RGB, data row-major, flat or nested;
- `images`: BYTES, shape [N], each element an encoded JPEG/PNG/WebP image; in JSON as a base64 string (JSON strings
  cannot carry raw bytes; the input parameter `"content_type": "base64"`, MLServer's name, may say so explicitly).
It returns one output tensor, `probabilities`: FP32, shape [N, num_classes], flattened row-major.
Triton's binary tensor data extension is supported (the default of tritonclient.http): an input with the parameter
`binary_data_size` has its raw bytes after the JSON (`Inference-Header-Content-Length` gives the JSON's length;
a BYTES element is a 4-byte little-endian length then the bytes), and `binary_data` on the output (or
`binary_data_output` on the request) returns the probabilities as little-endian float32 bytes the same way.
Errors are `{"error": message, "code": code}` with the codes of service.errors (docs/errors.md): 400 bad request,
404 unknown model or version, 413 body or image too large, 415 unsupported content or image format, 503 not ready or
overloaded (with Retry-After), 504 past the request deadline. The protocol has no per-element errors: the first
bad image fails the whole request.

Two of Triton's extensions, so that its tools (perf_analyzer, tritonclient) work: model configuration
(`GET .../config`: Triton's model configuration as JSON, built from the package and the batcher's settings) and
statistics (`GET .../stats`, `GET /v2/models/stats`: the counters of service.statistics, summed over
every worker process). Both are listed in the server metadata's `extensions`, with the model repository extension
(service.repository_routes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES
from service import __version__
from service.classifier import Classifier
from service.errors import ApiError
from service.repository import ModelRepository, as_repository
from service.request_reading import admit_when_warm, decode_base64, media_type_of, parse_length, read_body
from service.settings import ServiceSettings

SERVER_NAME = "visionserve"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "model_repository"]
BYTES_INPUT_NAME = "images"  # the alternative input: encoded images, one per batch element
BYTES_CONTENT_TYPES = ("base64",)  # accepted values of a JSON BYTES input's `content_type` parameter
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension's header: bytes of JSON before the data
BINARY_MEDIA_TYPE = "application/octet-stream"

# The v2 "platform" of each package backend ("<project>_<format>", from the spec's list).
PLATFORMS = {
    "onnx": "onnx_onnxv1",
    "onnx-int8": "onnx_onnxv1",
    "torchscript": "pytorch_torchscript",
}
# Triton's name for the same formats, in the model configuration.
TRITON_PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "onnx-int8": "onnxruntime_onnx",
    "torchscript": "pytorch_libtorch",
}


@dataclass(frozen=True)
class InputLimits:
    """What one infer request may hold."""

    input_size: tuple[int, int]  # (H, W) of the model
    max_images: int  # N per request
    max_image_bytes: int  # one encoded image


@dataclass(frozen=True)
class InferRequest:
    """A validated infer request: exactly one of `pixels` and `encoded` is set."""

    id: str | None
    pixels: np.ndarray | None  # (N, H, W, 3) uint8, from a UINT8 `pixels` tensor
    encoded: tuple[bytes, ...] | None  # N encoded images, from a BYTES `images` tensor
    binary_output: bool = False  # answer the probabilities as binary data (the extension)


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(code, message)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary data) of an infer body; without the extension's header the whole body is JSON."""
    if header_length is None:
        return body, b""
    length = parse_length(header_length)
    if length is None or not 0 < length <= len(body):
        raise bad_request(f"{HEADER_LENGTH} must be a length between 1 and the body's {len(body)} bytes")
    return body[:length], body[length:]


def parse_infer_request(body: bytes, limits: InputLimits, binary: bytes = b"") -> InferRequest:
    """An infer request's JSON (+ the binary data after it) -> a validated InferRequest; else ApiError(400)."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad_request(f"the body is not valid JSON: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(request, dict):
        raise bad_request("the body must be a JSON object (an inference request)", "invalid_json")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request('"id" must be a string')
    parameters = _parameters(request, "the request")
    binary_output = _binary_output(request.get("outputs"), parameters.get("binary_data_output", False))
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request('"inputs" must be a non-empty list of input tensors')
    if len(inputs) != 1:
        raise bad_request(f"the model takes exactly one input tensor, got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise bad_request("an input tensor must be a JSON object")
    missing = [key for key in ("name", "shape", "datatype") if key not in tensor]
    if missing:
        raise bad_request(f"the input tensor lacks {', '.join(missing)}")
    name = tensor["name"]
    tensor_parameters = _parameters(tensor, f"input {name!r}")
    binary_size = tensor_parameters.get("binary_data_size")
    if binary_size is None:
        if "data" not in tensor:
            raise bad_request(f"input {name!r} has no data (and no binary_data_size)")
        if binary:
            raise bad_request(f"the body has {len(binary)} bytes of binary data but no input declares binary_data_size")
    else:
        if "data" in tensor:
            raise bad_request(f"input {name!r} has both data and binary_data_size")
        if type(binary_size) is not int or binary_size != len(binary):
            raise bad_request(
                f"input {name!r} declares binary_data_size {binary_size!r} but {len(binary)} bytes follow the JSON"
            )
    shape = _shape(tensor["shape"])
    if name == INPUT_NAME:
        pixels = _pixels(tensor, shape, limits, binary if binary_size is not None else None)
        return InferRequest(request_id, pixels, None, binary_output)
    if name == BYTES_INPUT_NAME:
        encoded = _encoded_images(tensor, shape, limits, binary if binary_size is not None else None)
        return InferRequest(request_id, None, encoded, binary_output)
    height, width = limits.input_size
    raise bad_request(
        f"unknown input {name!r}; this model takes {INPUT_NAME!r} (UINT8 [N, {height}, {width}, 3]) "
        f"or {BYTES_INPUT_NAME!r} (BYTES [N] of encoded JPEG/PNG/WebP images)"
    )


def _parameters(owner: dict, where: str) -> dict:
    parameters = owner.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request(f'"parameters" of {where} must be a JSON object')
    return parameters


def _binary_output(outputs: Any, default: Any) -> bool:
    """Whether the probabilities go back as binary data: the output's `binary_data`, else the request's default."""
    if not isinstance(default, bool):
        raise bad_request('"binary_data_output" must be true or false')
    if outputs is None:
        return default
    if not isinstance(outputs, list):
        raise bad_request('"outputs" must be a list of requested output tensors')
    binary = default
    for output in outputs:
        if not isinstance(output, dict) or output.get("name") != OUTPUT_PROBABILITIES:
            name = output.get("name") if isinstance(output, dict) else output
            raise bad_request(f"unknown output {name!r}; this model has one output, {OUTPUT_PROBABILITIES!r}")
        binary = _parameters(output, f"output {OUTPUT_PROBABILITIES!r}").get("binary_data", default)
        if not isinstance(binary, bool):
            raise bad_request('"binary_data" must be true or false')
    return binary


def _shape(shape: Any) -> tuple[int, ...]:
    # bool is an int subclass in Python: refuse [true, 32, ...] explicitly.
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise bad_request(f'"shape" must be a list of integers, got {shape!r}'[:300])
    if any(d < 0 for d in shape):
        raise bad_request(f'"shape" dimensions must be >= 0, got {shape}')
    return tuple(shape)


def _check_batch(n: int, limits: InputLimits) -> None:
    if n < 1:
        raise bad_request("the batch is empty (N = 0); send at least one image", "empty_batch")
    if n > limits.max_images:
        raise bad_request(
            f"the batch has {n} images, more than the limit of {limits.max_images}",
            "too_many_images",
        )


def _pixels(tensor: dict, shape: tuple[int, ...], limits: InputLimits, binary: bytes | None) -> np.ndarray:
    """A UINT8 tensor (JSON data, flat or nested, row-major; or binary data) -> (N, H, W, 3) uint8."""
    height, width = limits.input_size
    if tensor["datatype"] != "UINT8":
        raise bad_request(f"input {INPUT_NAME!r} must have datatype UINT8, got {tensor['datatype']!r}")
    if len(shape) != 4 or shape[1:] != (height, width, 3):
        raise bad_request(f"input {INPUT_NAME!r} must have shape [N, {height}, {width}, 3], got {list(shape)}")
    _check_batch(shape[0], limits)
    expected = math.prod(shape)
    if binary is not None:  # one byte per element
        if len(binary) != expected:
            raise bad_request(
                f"input {INPUT_NAME!r} has shape {list(shape)} ({expected} bytes) but {len(binary)} bytes of binary data"
            )
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape)
    data = tensor["data"]
    if not isinstance(data, list):
        raise bad_request(f'"data" of input {INPUT_NAME!r} must be a JSON array')
    # Cheap length checks before numpy walks the lists: flat has prod(shape) elements, nested has N rows.
    if len(data) not in (expected, shape[0]):
        raise bad_request(
            f"input {INPUT_NAME!r} has shape {list(shape)} ({expected} elements) but its data has {len(data)}"
        )
    try:
        values = np.array(data)
    except (ValueError, TypeError, RecursionError):  # ragged nesting
        raise bad_request(f'"data" of input {INPUT_NAME!r} is not a regular array of shape {list(shape)}') from None
    if values.shape != shape and values.shape != (expected,):
        raise bad_request(
            f"input {INPUT_NAME!r} has shape {list(shape)} ({expected} elements) but its data has shape "
            f"{list(values.shape)}"
        )
    # Integers only: no floats, booleans, strings or nulls (kind "O"); the spec lets a server refuse them.
    if values.dtype.kind not in "iu":
        raise bad_request(
            f"input {INPUT_NAME!r} must hold integers in 0..255 (UINT8), got {values.dtype.kind!r} values"
        )
    if values.min() < 0 or values.max() > 255:
        raise bad_request(f"input {INPUT_NAME!r} must hold integers in 0..255 (UINT8)")
    return values.astype(np.uint8).reshape(shape)


def _encoded_images(
    tensor: dict, shape: tuple[int, ...], limits: InputLimits, binary: bytes | None
) -> tuple[bytes, ...]:
    """A BYTES tensor (base64 strings in JSON, or length-prefixed binary data) -> the encoded images' bytes."""
    if tensor["datatype"] != "BYTES":
        raise bad_request(f"input {BYTES_INPUT_NAME!r} must have datatype BYTES, got {tensor['datatype']!r}")
    if len(shape) != 1:
        raise bad_request(f"input {BYTES_INPUT_NAME!r} must have shape [N], got {list(shape)}")
    _check_batch(shape[0], limits)
    if binary is not None:
        return _binary_elements(binary, shape[0], limits)
    content_type = tensor.get("parameters", {}).get("content_type", "base64")
    if content_type not in BYTES_CONTENT_TYPES:
        raise bad_request(
            f"input {BYTES_INPUT_NAME!r} has content_type {content_type!r}; valid: {', '.join(BYTES_CONTENT_TYPES)}"
        )
    data = tensor["data"]
    if not isinstance(data, list) or len(data) != shape[0]:
        count = len(data) if isinstance(data, list) else "no array"
        raise bad_request(f"input {BYTES_INPUT_NAME!r} has shape {list(shape)} but its data has {count} elements")
    # The base64 length is checked before decoding, so an oversized string costs no decoding work.
    max_chars = 4 * math.ceil(limits.max_image_bytes / 3)
    images = []
    for index, element in enumerate(data):
        if not isinstance(element, str):
            raise bad_request(f"element {index} of input {BYTES_INPUT_NAME!r} must be a base64 string")
        if len(element) > max_chars:
            raise image_too_large(index, limits)
        try:
            images.append(decode_base64(element))
        except ApiError as exc:
            raise exc.with_message(f"element {index} of input {BYTES_INPUT_NAME!r}: {exc.message}") from None
    return tuple(images)


def _binary_elements(binary: bytes, count: int, limits: InputLimits) -> tuple[bytes, ...]:
    """`count` BYTES elements, each a 4-byte little-endian unsigned length then that many bytes, filling `binary`."""
    images, offset = [], 0
    for index in range(count):
        if offset + 4 > len(binary):
            raise bad_request(f"the binary data ends before element {index} of {count}")
        length = int.from_bytes(binary[offset : offset + 4], "little")
        offset += 4
        if length > limits.max_image_bytes:
            raise image_too_large(index, limits)
        if offset + length > len(binary):
            raise bad_request(f"element {index} declares {length} bytes but the binary data ends first")
        images.append(binary[offset : offset + length])
        offset += length
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} bytes of binary data follow the last of {count} elements")
    return tuple(images)


def image_too_large(index: int, limits: InputLimits) -> ApiError:
    return ApiError("image_too_large", f"element {index} is over the limit of {limits.max_image_bytes} bytes")


async def infer_parsed(classifier: Classifier, parsed: InferRequest, deadline: float) -> np.ndarray:
    """The probabilities of a validated infer request (REST or gRPC): its pixels, or its encoded images decoded; the
    protocol has no per-element errors, so the first bad image fails the whole request."""
    pixels = parsed.pixels
    if pixels is None:
        decoded = await classifier.decode_many(list(parsed.encoded))
        for index, entry in enumerate(decoded):
            if isinstance(entry, ApiError):
                raise entry.with_message(f"element {index} of {BYTES_INPUT_NAME!r}: {entry.message}")
        pixels = np.stack(decoded)
    return await classifier.infer(pixels, deadline)


def infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    probabilities: np.ndarray,
    binary_output: bool = False,
) -> Response:
    """The $inference_response for (N, C) float32 probabilities: JSON, or JSON + the extension's binary data."""
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:  # "if specified this identifier must be returned in the response"
        response["id"] = request_id
    output: dict[str, Any] = {
        "name": OUTPUT_PROBABILITIES,
        "shape": list(probabilities.shape),
        "datatype": "FP32",
    }
    response["outputs"] = [output]
    if not binary_output:
        output["data"] = probabilities.astype(np.float32).ravel().tolist()
        return JSONResponse(response)
    data = probabilities.astype("<f4").tobytes()  # little-endian, row-major
    output["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(response).encode()
    return Response(header + data, media_type=BINARY_MEDIA_TYPE, headers={HEADER_LENGTH: str(len(header))})


def input_limits(classifier: Classifier) -> InputLimits:
    """What one infer request to `classifier` may hold; one encoded image can be no bigger than the whole body (the
    per-element check refuses it before decoding)."""
    settings = classifier.settings
    return InputLimits(tuple(classifier.spec.input_size), settings.max_batch_images, settings.max_body_bytes)


def model_metadata(classifier: Classifier, versions: list[str] | None = None) -> dict[str, Any]:
    """The $metadata_model_response; `parameters` (a server-specific addition) carries what the spec has no field for.
    `versions`: the model's loaded versions (by default the classifier's own)."""
    spec, package, info = classifier.spec, classifier.package, classifier.info
    height, width = spec.input_size
    return {
        "name": package.name,
        "versions": versions or [package.version],
        "platform": PLATFORMS[info.backend],
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [-1, height, width, 3]}],
        "outputs": [{"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, spec.num_classes]}],
        "parameters": {
            "classes": list(spec.class_names),
            "input_height": height,
            "input_width": width,
            "sha256": package.sha256(info.backend),
            "backend": info.backend,
            "execution_provider": info.provider,
            "device": info.device,
            "fallback_reason": info.fallback_reason or "",
            "tf32": info.tf32,
            "alternative_input": f"{BYTES_INPUT_NAME} BYTES [-1] encoded JPEG/PNG/WebP (base64 in JSON)",
        },
    }


def model_config(
    name: str,
    input_size: tuple[int, int],
    num_classes: int,
    backend: str,
    device: str,
    settings: ServiceSettings,
) -> dict[str, Any]:
    """Triton's model configuration (its ModelConfig as JSON) of what this server really does with the model.

    `max_batch_size` is VISIONSERVE_MAX_BATCH_IMAGES, the most images one request may carry: that is what Triton's
    clients read it for (perf_analyzer refuses a larger -b), and a request bigger than one model call
    (VISIONSERVE_MAX_BATCH_SIZE) is split by the batcher. Dims leave out the batch dimension, as Triton's do.
    """
    height, width = input_size
    return {
        "name": name,
        "platform": TRITON_PLATFORMS[backend],
        "max_batch_size": settings.max_batch_images,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [height, width, 3]}],
        "output": [{"name": OUTPUT_PROBABILITIES, "data_type": "TYPE_FP32", "dims": [num_classes]}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(settings.max_latency_ms * 1000)},
        "instance_group": [
            {
                "name": name,
                "kind": "KIND_GPU" if device == "cuda" else "KIND_CPU",
                "count": settings.model_instances,
            }
        ],
    }


def server_metadata() -> dict[str, Any]:
    return {
        "name": SERVER_NAME,
        "version": __version__,
        "extensions": EXTENSIONS,
    }


def classifier_config(classifier: Classifier) -> dict[str, Any]:
    """model_config of one loaded version, with its model's settings."""
    spec, info = classifier.spec, classifier.info
    return model_config(
        classifier.package.name,
        tuple(spec.input_size),
        spec.num_classes,
        info.backend,
        info.device,
        classifier.settings,
    )


def statistics(repository: ModelRepository, name: str | None = None, version: str | None = None) -> dict[str, Any]:
    """The statistics extension's answer: of one version, of every loaded version of `name`, or of every model."""
    if version is not None:
        chosen = [repository.get(name, version)]
    elif name is not None:
        repository.get(name)  # 404 unless served
        chosen = [repository.get(name, v) for v in repository.versions(name)]
    else:
        chosen = [classifier for _, classifiers in repository.loaded() for classifier in classifiers]
    return {
        "model_stats": [
            classifier.batcher.statistics.model_stats(classifier.package.name, classifier.package.version)
            for classifier in chosen
        ]
    }


def routes(served: ModelRepository | Classifier) -> list[Route]:
    """The v2 routes over every model of `served` (one classifier is a repository of one model).

    They raise ApiError; the app that mounts them renders it as `{"error", "code"}` (service.app does).
    """
    repository = as_repository(served)
    settings = repository.settings

    def chosen(request: Request) -> Classifier:
        """The path's model and version (its default when the path has none); 404 naming what is served."""
        return repository.get(request.path_params["name"], request.path_params.get("version"))

    async def server(request: Request) -> Response:
        return JSONResponse(server_metadata())

    # The protocol's health answers: "A 200 status code indicates true and a 4xx status code indicates false"
    # (400, as Triton answers). BentoML's own /livez and /readyz answer 503 for false, as load balancers expect.
    async def live(request: Request) -> Response:
        is_live = repository.failure is None  # a failed warm-up at start-up leaves the server up but dead
        return JSONResponse({"live": is_live}, status_code=200 if is_live else 400)

    async def ready(request: Request) -> Response:
        is_ready = bool(repository.ready)
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 400)

    async def metadata(request: Request) -> Response:
        classifier = chosen(request)
        return JSONResponse(model_metadata(classifier, repository.versions(classifier.package.name)))

    async def model_ready(request: Request) -> Response:
        classifier = chosen(request)
        is_ready = bool(classifier.ready)
        return JSONResponse(
            {"name": classifier.package.name, "ready": is_ready},
            status_code=200 if is_ready else 400,
        )

    async def config(request: Request) -> Response:
        return JSONResponse(classifier_config(chosen(request)))

    async def stats(request: Request) -> Response:
        params = request.path_params  # none on /v2/models/stats: every model's
        return JSONResponse(statistics(repository, params.get("name"), params.get("version")))

    async def infer(request: Request) -> Response:
        deadline = settings.request_deadline()  # counted from arrival
        # Held until the answer: a rollout meanwhile leaves this request on the version that admitted it.
        with repository.lease(request.path_params["name"], request.path_params.get("version")) as classifier:
            await admit_when_warm(classifier)
            media_type_of(request)  # refuses a pickle content type (415); JSON or the binary extension's body follow
            body = await read_body(request, settings.max_body_bytes, repository.uploads, deadline)
            header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
            # Parsing a large tensor would hold up every other request on the event loop.
            parsed = await classifier.run_in_pool(parse_infer_request, header, input_limits(classifier), binary)
            probabilities = await infer_parsed(classifier, parsed, deadline)
        package = classifier.package
        return infer_response(package.name, package.version, parsed.id, probabilities, parsed.binary_output)

    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    return [
        Route("/v2", server, methods=["GET"]),
        Route("/v2/", server, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/stats", stats, methods=["GET"]),  # before {name}, which would take "stats" as a name
        Route(model, metadata, methods=["GET"]),
        Route(version, metadata, methods=["GET"]),
        Route(f"{model}/ready", model_ready, methods=["GET"]),
        Route(f"{version}/ready", model_ready, methods=["GET"]),
        Route(f"{model}/infer", infer, methods=["POST"]),
        Route(f"{version}/infer", infer, methods=["POST"]),
        Route(f"{model}/config", config, methods=["GET"]),
        Route(f"{version}/config", config, methods=["GET"]),
        Route(f"{model}/stats", stats, methods=["GET"]),
        Route(f"{version}/stats", stats, methods=["GET"]),
    ]
