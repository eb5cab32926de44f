"""The upload budget: how many bytes of request bodies a worker receives at once."""

from __future__ import annotations

from service.errors import ApiError

# Bodies up to this size are never refused by the budget: their memory is bounded by the connections.
SMALL_BODY_BYTES = 256 * 1024


class UploadBudget:
    """The bytes of request bodies being received at once in this worker: a flood of large uploads is refused
    (503, before its bodies are read) instead of filling memory, while small requests keep being served."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0

    def reserve(self, count: int, body_bytes: int) -> None:
        """Count `count` more bytes of a body now `body_bytes` long (declared, or received so far) as being received,
        or raise 503 too_many_uploads if they do not fit. The exemption goes by the body's size, not the increment: a
        chunked body arrives in small pieces."""
        if body_bytes > SMALL_BODY_BYTES and self.in_flight + count > self.max_bytes:
            raise ApiError(
                "too_many_uploads",
                f"too many bytes of uploads are being received ({self.in_flight}); retry later",
                {"Retry-After": "1"},
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
