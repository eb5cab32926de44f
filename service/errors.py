"""Every error code the service answers, its HTTP status and its meaning, and ApiError, which carries one.

The rule for sizes: `body_too_large` is a request body over VISIONSERVE_MAX_BODY_BYTES; `image_too_large` is one
image over a limit (its encoded bytes, or its pixels from the header or the decode), on every route.
docs/errors.md is this table in prose; tests check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.imaging import ImageDecodeError


@dataclass(frozen=True)
class ErrorCode:
    status: int | None  # None: the status of Starlette's own refusal
    meaning: str


ERRORS: dict[str, ErrorCode] = {
    # The request as a whole.
    "unauthorized": ErrorCode(
        401,
        "no valid API key (Authorization: Bearer KEY) where VISIONSERVE_API_KEYS_FILE requires one, or no admin key "
        "(VISIONSERVE_ADMIN_KEYS_FILE) for loading or unloading a model",
    ),
    "invalid_http": ErrorCode(
        400, "bytes that are not an HTTP/1.1 request (a TLS handshake at the plain HTTP port, say; then closed)"
    ),
    "request_head_timeout": ErrorCode(
        408, "the request line and headers did not arrive within VISIONSERVE_REQUEST_HEAD_TIMEOUT_S (then closed)"
    ),
    "request_head_too_large": ErrorCode(431, "the request line and headers are over 64 KiB (then closed)"),
    "pickle_refused": ErrorCode(415, "a pickle content type: unpickling runs code, so it is never read"),
    "unsupported_media_type": ErrorCode(415, "a content type the route does not take"),
    "invalid_content_length": ErrorCode(400, "a Content-Length header that is not a number"),
    "body_too_large": ErrorCode(
        413, "the request body (declared, streamed or decompressed) is over VISIONSERVE_MAX_BODY_BYTES"
    ),
    "unsupported_content_encoding": ErrorCode(415, "a Content-Encoding other than gzip, deflate or identity"),
    "invalid_content_encoding": ErrorCode(400, "a gzip or deflate body that does not decompress, or ends early"),
    "body_timeout": ErrorCode(
        408, "the request body had not all arrived VISIONSERVE_REQUEST_TIMEOUT_S after the request did (then closed)"
    ),
    "client_disconnected": ErrorCode(400, "the client closed the connection before the whole body arrived"),
    "invalid_multipart": ErrorCode(400, "a malformed multipart body, or an image part that is not a file upload"),
    "invalid_json": ErrorCode(400, "a body that is not JSON, not an object, or has unknown fields"),
    "invalid_request": ErrorCode(
        400, "a /v2 request (inference or repository) that breaks the protocol or the model's inputs"
    ),
    "url_not_supported": ErrorCode(400, "a JSON body with a URL: the server never fetches URLs"),
    "missing_image": ErrorCode(400, "/classify without an image (multipart field `image`, or JSON `image`)"),
    "no_images": ErrorCode(400, "/classify_batch without any multipart field `images`"),
    "empty_batch": ErrorCode(400, "a /v2 input tensor with N = 0"),
    "too_many_images": ErrorCode(400, "more images in one request than VISIONSERVE_MAX_BATCH_IMAGES"),
    "invalid_top_k": ErrorCode(400, "top_k that is not an integer between 1 and the number of classes"),
    "invalid_input": ErrorCode(400, "pixels of the wrong shape or dtype for the model"),
    "invalid_model_choice": ErrorCode(
        400, "no `model` while several models are served, or the query and the body naming different ones"
    ),
    "invalid_model_name": ErrorCode(
        400, "a model or version name with a path separator or '..', a path outside the repository, or not a folder"
    ),
    "model_not_found": ErrorCode(404, "a model that this server does not serve (unknown, or unloaded)"),
    "version_not_found": ErrorCode(404, "a model version that is not loaded (or, to load, not in the repository)"),
    # One image (in /classify_batch, that image's entry in `results`; elsewhere the whole request).
    "invalid_base64": ErrorCode(400, "an image string that is not standard base64"),
    "empty": ErrorCode(400, "an image of zero bytes"),
    "corrupt": ErrorCode(400, "an image whose bytes do not decode (truncated or damaged)"),
    "unsupported_format": ErrorCode(
        415, "an image that is not JPEG, MPO, PNG, WebP, AVIF or HEIC/HEIF (HEIC with the photos extra)"
    ),
    "image_too_large": ErrorCode(
        413, "one image over a limit: its bytes over the body limit, or its pixels over VISIONSERVE_MAX_IMAGE_PIXELS"
    ),
    # Loading a model version (POST /v2/repository/models/{name}/load); the version serving keeps serving.
    "load_in_progress": ErrorCode(409, "the model is already loading a version; retry when it is done"),
    "package_invalid": ErrorCode(
        422, "the version's package fails verification: a missing or tampered file (sha256), a bad manifest"
    ),
    "model_load_failed": ErrorCode(422, "the version's runtime session could not be created, or its warm-up failed"),
    # The server's state.
    "not_ready": ErrorCode(503, "the model is still loading or warming up (with Retry-After)"),
    "queue_full": ErrorCode(503, "more images waiting than VISIONSERVE_MAX_QUEUE (with Retry-After)"),
    "too_many_uploads": ErrorCode(
        503, "a body over 256 KiB while VISIONSERVE_MAX_UPLOAD_BYTES_IN_FLIGHT are being received (with Retry-After)"
    ),
    "shutting_down": ErrorCode(503, "the server stopped while the request was queued"),
    "deadline_exceeded": ErrorCode(504, "no answer within VISIONSERVE_REQUEST_TIMEOUT_S of the request's arrival"),
    # Starlette's own refusals, and anything unexpected.
    "not_found": ErrorCode(404, "a path that no route has"),
    "method_not_allowed": ErrorCode(405, "a route called with the wrong method"),
    "http_error": ErrorCode(None, "any other refusal by Starlette, with its status"),
    "internal": ErrorCode(500, "an unexpected server error (logged)"),
}


def status_of(code: str) -> int:
    """The HTTP status of `code`; a code missing from ERRORS is a bug, so it raises KeyError."""
    status = ERRORS[code].status
    if status is None:
        raise KeyError(f"{code!r} takes the status of Starlette's refusal")
    return status


class ApiError(Exception):
    """A request the service refuses; rendered as `{"error": message, "code": code}` with the code's status.

    The Open Inference Protocol requires the "error" field; "code" is a stable machine-readable reason from
    ERRORS (also the `reason` label of the rejected-requests metric).
    """

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status_of(code)
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}

    def with_message(self, message: str) -> ApiError:
        """The same refusal, told in other words (e.g. naming the element of a batch it concerns)."""
        return ApiError(self.code, message, self.headers)

    @classmethod
    def from_decode_error(cls, exc: ImageDecodeError) -> ApiError:
        return cls(exc.reason if exc.reason in ERRORS else "corrupt", str(exc))
