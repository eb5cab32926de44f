"""Request errors of the HTTP service: a status, a stable code and a message, rendered as a JSON body."""

from __future__ import annotations

from inference.imaging import ImageDecodeError

# ImageDecodeError.reason -> HTTP status.
DECODE_ERROR_STATUS = {
    "empty": 400,
    "corrupt": 400,
    "unsupported_format": 415,
    "too_large": 413,
}


class ApiError(Exception):
    """A request the service refuses; rendered as `{"error": message, "code": code}` with `status`.

    The Open Inference Protocol requires the "error" field; "code" is a stable machine-readable reason
    (also the `reason` label of the rejected-requests metric).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "code": self.code}

    @classmethod
    def from_decode_error(cls, exc: ImageDecodeError) -> ApiError:
        return cls(DECODE_ERROR_STATUS.get(exc.reason, 400), exc.reason, str(exc))
