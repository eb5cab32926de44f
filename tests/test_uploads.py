"""The upload budget (service.uploads) and read_body's use of it: large bodies beyond the bytes a worker may be
receiving at once are refused with 503 before they are read, small ones always pass, and every byte is given back."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from service.errors import ApiError
from service.request_reading import read_body
from service.settings import ServiceSettings, SettingsError
from service.uploads import SMALL_BODY_BYTES, UploadBudget

MB = 1024 * 1024
DEADLINE = float("inf")  # these bodies' timing is not what is tested


def request(chunks: list[bytes], content_length: int | None, reads: list[int]) -> Request:
    """A request whose body arrives in `chunks`; `reads` records each chunk handed to the app."""
    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    pending = list(chunks)

    async def receive():
        chunk = pending.pop(0) if pending else b""
        reads.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def test_large_uploads_past_the_budget_are_refused_and_small_ones_always_fit():
    budget = UploadBudget(3 * MB)
    budget.reserve(2 * MB, 2 * MB)
    with pytest.raises(ApiError) as refused:
        budget.reserve(2 * MB, 2 * MB)
    assert refused.value.code == "too_many_uploads" and refused.value.status == 503
    assert refused.value.headers["Retry-After"] == "1"
    budget.reserve(SMALL_BODY_BYTES, SMALL_BODY_BYTES)  # small bodies are bounded by the connections, never refused
    budget.reserve(SMALL_BODY_BYTES, SMALL_BODY_BYTES)
    budget.release(2 * MB + 2 * SMALL_BODY_BYTES)
    assert budget.in_flight == 0
    budget.reserve(3 * MB, 3 * MB)


def test_a_declared_body_that_does_not_fit_is_refused_before_any_byte_is_read():
    budget = UploadBudget(4 * MB)
    budget.reserve(3 * MB, 3 * MB)  # another upload being received
    reads: list[int] = []
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(request([b"x" * MB, b"x" * MB], 2 * MB, reads), 16 * MB, budget, DEADLINE))
    assert refused.value.code == "too_many_uploads" and reads == []
    assert budget.in_flight == 3 * MB


def test_a_chunked_body_reserves_as_it_arrives_and_is_refused_once_it_does_not_fit():
    budget = UploadBudget(4 * MB)
    budget.reserve(2 * MB, 2 * MB)
    reads: list[int] = []
    chunks = [b"x" * MB] * 5
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(request(chunks, None, reads), 16 * MB, budget, DEADLINE))
    assert refused.value.code == "too_many_uploads"
    assert len(reads) == 3  # refused with the third megabyte, the other two never read
    assert budget.in_flight == 2 * MB  # what the refused body held is given back


def test_a_chunked_body_in_small_pieces_counts_against_the_budget_once_it_is_large():
    budget = UploadBudget(4 * MB)
    budget.reserve(3 * MB, 3 * MB)
    reads: list[int] = []
    chunks = [b"x" * (64 * 1024)] * 64  # 4 MB as a server receives it, in 64 KiB pieces
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(request(chunks, None, reads), 16 * MB, budget, DEADLINE))
    assert refused.value.code == "too_many_uploads"
    assert len(reads) == 17  # 16 pieces fill the 1 MiB of room left; the 17th is refused
    assert budget.in_flight == 3 * MB


def test_a_body_that_fits_is_read_whole_and_its_bytes_given_back():
    budget = UploadBudget(4 * MB)
    reads: list[int] = []
    body = asyncio.run(read_body(request([b"a" * MB, b"b" * MB], 2 * MB, reads), 16 * MB, budget, DEADLINE))
    assert body == b"a" * MB + b"b" * MB and budget.in_flight == 0


def test_the_budget_must_hold_one_body_of_the_largest_size():
    with pytest.raises(SettingsError, match="MAX_UPLOAD_BYTES_IN_FLIGHT"):
        ServiceSettings(max_body_bytes=64 * MB, max_upload_bytes_in_flight=32 * MB)


def test_a_body_still_arriving_at_the_deadline_is_refused_with_408_and_connection_close():
    async def slow_body() -> ApiError:
        sent = [{"type": "http.request", "body": b"first part", "more_body": True}]

        async def receive():
            if sent:
                return sent.pop()
            await asyncio.sleep(3600)  # the rest never comes

        slow = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        deadline = asyncio.get_running_loop().time() + 0.2
        with pytest.raises(ApiError) as refused:
            await read_body(slow, 16 * MB, UploadBudget(16 * MB), deadline)
        return refused.value

    refused = asyncio.run(slow_body())
    assert (refused.status, refused.code, refused.headers) == (408, "body_timeout", {"Connection": "close"})


def test_a_client_leaving_mid_body_is_a_client_disconnect_and_a_whole_body_needs_no_time():
    messages = [{"type": "http.request", "body": b"part", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    leaving = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(leaving, 16 * MB, UploadBudget(16 * MB), DEADLINE))
    assert refused.value.code == "client_disconnected"
    # A body that came whole is read even when its deadline has passed: no timer runs for it.
    reads: list[int] = []
    assert asyncio.run(read_body(request([b"whole"], 5, reads), 16 * MB, UploadBudget(16 * MB), 0.0)) == b"whole"
