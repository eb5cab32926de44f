"""Reading a request, shared by both route sets: admission, media type, body limits, multipart forms, base64.

Each check refuses as early as it can, so that a request that will fail costs as little as possible: readiness
and queue room (503) before anything else, the content type (415; pickle is always refused) before the body,
the declared Content-Length (413) before any byte of the body, and a streamed body (413) as soon as it passes
the limit. A body sent with Content-Encoding gzip or deflate (tritonclient's request_compression_algorithm, as
Triton accepts) is decompressed, and refused (413) as soon as it decodes past the same limit. A body that has not
all arrived by the request's deadline is refused (408) and its connection closed. No URL is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import re
import zlib
from collections.abc import AsyncIterator

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from service.classifier import Classifier
from service.errors import ApiError
from service.multipart import FilePart, FormItems, simple_form
from service.uploads import UploadBudget

MULTIPART = "multipart/form-data"
MAX_FORM_FIELDS = 8  # non-file fields (top_k); more is not a real client
DIGITS = re.compile(r"[0-9]+")
DATA_URL_PREFIX = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
CONTENT_CODINGS = ("gzip", "x-gzip", "deflate")
# Decompressed this much at a time, so that a body that decodes past the limit is refused before it is all decoded.
INFLATE_CHUNK_BYTES = 1 << 20


def admit(classifier: Classifier | None) -> Classifier:
    """The classifier, if it is ready and its queue has room for one more image; else 503 with Retry-After.

    Called before the body is read, so that a refusal under overload costs no body read and no decode.
    """
    if classifier is None or not classifier.ready:
        raise ApiError("not_ready", "the model is still loading or warming up", {"Retry-After": "1"})
    classifier.batcher.admit()
    return classifier


async def admit_when_warm(classifier: Classifier | None) -> Classifier:
    """admit, once a warm-up in progress has finished (at most the request timeout later): a worker that has just
    started, or restarted after a crash, serves the requests that reached it rather than refusing them."""
    if classifier is not None and classifier.warming_up:
        await classifier.wait_until_warm(classifier.settings.request_timeout_s)
    return admit(classifier)


def media_type_of(request: Request) -> str:
    """The request's media type, lower-cased without parameters; a pickle content type is refused (415)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if "pickle" in media_type:
        raise ApiError("pickle_refused", "pickled bodies are never accepted (unpickling runs code)")
    return media_type


def unsupported_media_type(media_type: str, accepted: list[str]) -> ApiError:
    return ApiError(
        "unsupported_media_type",
        f"content type {media_type or '(none)'!r} is not accepted here; send one of {', '.join(accepted)}",
    )


async def read_body(request: Request, max_bytes: int, uploads: UploadBudget, deadline: float) -> bytes:
    """The whole body, its content coding undone, refusing (413) a declared, streamed or decoded size over
    `max_bytes` without reading or decoding the rest, (503) one that would take the bytes being received past
    the upload budget, and (408) one still arriving at `deadline` (the event loop's time)."""
    coding = content_coding(request)
    body = await read_raw_body(request, max_bytes, uploads, deadline)
    if coding is None:
        return body
    # Off the event loop: a small body may take a megabyte-sized decode.
    return await asyncio.to_thread(inflate, body, coding, max_bytes)


def content_coding(request: Request) -> str | None:
    """The body's Content-Encoding if it is one that is decoded here, None for none (or identity); else 415."""
    coding = request.headers.get("content-encoding", "identity").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in CONTENT_CODINGS:
        raise ApiError(
            "unsupported_content_encoding",
            f"Content-Encoding {coding!r} is not accepted; send the body as it is, or compressed with gzip or deflate",
        )
    return coding


def inflate(body: bytes, coding: str, max_bytes: int) -> bytes:
    """`body` with its gzip or deflate coding undone: 413 as soon as it decodes past `max_bytes` (a few kilobytes
    can decode to gigabytes), 400 if it is not one whole stream of that coding."""
    inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or a zlib header, whichever the body has
    parts = []
    decoded = 0
    pending = body
    try:
        while not inflater.eof:
            part = inflater.decompress(pending, INFLATE_CHUNK_BYTES)
            pending = inflater.unconsumed_tail
            if not part and not pending:
                break  # the body ended before its stream did
            decoded += len(part)
            if decoded > max_bytes:
                raise ApiError(
                    "body_too_large", f"the request body decodes ({coding}) to more than the limit of {max_bytes} bytes"
                )
            parts.append(part)
    except zlib.error as exc:
        raise ApiError("invalid_content_encoding", f"the body is not valid {coding} data: {exc}") from None
    if not inflater.eof or inflater.unused_data:
        raise ApiError("invalid_content_encoding", f"the body is not one complete {coding} stream")
    return b"".join(parts)


async def read_raw_body(request: Request, max_bytes: int, uploads: UploadBudget, deadline: float) -> bytes:
    """The body as it arrives, refusing (413) a declared or streamed size over `max_bytes` without reading the rest,
    (503) one that would take the bytes being received past the upload budget, and (408) one still arriving at
    `deadline`."""
    declared = request.headers.get("content-length")
    reserved = 0
    if declared is not None:
        length = parse_length(declared)
        if length is None:
            raise ApiError("invalid_content_length", f"Content-Length {declared!r} is not a number")
        if length > max_bytes:
            raise body_too_large(max_bytes)
        uploads.reserve(length, length)
        reserved = length
    chunks = []
    received = 0
    try:
        async for chunk in body_chunks(request, deadline):
            received += len(chunk)
            if received > max_bytes:  # a chunked body (or one longer than declared)
                raise body_too_large(max_bytes)
            if received > reserved:  # a chunked body reserves as it arrives
                uploads.reserve(received - reserved, received)
                reserved = received
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError("client_disconnected", "the client closed the connection mid-body") from None
    finally:
        uploads.release(reserved)
    return b"".join(chunks)


def parse_length(value: str) -> int | None:
    """A header's byte count: ASCII digits only (str.isdigit also takes '¹', which int() refuses), else None."""
    value = value.strip()
    return int(value) if DIGITS.fullmatch(value) else None


async def body_chunks(request: Request, deadline: float) -> AsyncIterator[bytes]:
    """The body's chunks as the server receives them; ClientDisconnect if the client leaves first.

    A body that came whole with the request head (the common small one) is read without a timer. Past its first
    chunk, a body still arriving at `deadline` is refused with 408 and `Connection: close`: the client may still be
    sending the rest, which the connection cannot carry to another request. Without this, a body sent a few bytes
    at a time held its connection and its share of the upload budget until BentoML's own timeout."""
    more_expected = False
    while True:
        if more_expected:
            try:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                message = await asyncio.wait_for(request.receive(), remaining)
            except asyncio.TimeoutError:
                raise ApiError(
                    "body_timeout", "the request body did not all arrive in time", {"Connection": "close"}
                ) from None
        else:
            message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if chunk := message.get("body", b""):
            yield chunk
        more_expected = message.get("more_body", False)
        if not more_expected:
            return


def body_too_large(max_bytes: int) -> ApiError:
    return ApiError("body_too_large", f"the request body is larger than the limit of {max_bytes} bytes")


async def read_form(
    request: Request, max_bytes: int, uploads: UploadBudget, deadline: float, max_files: int
) -> FormData:
    """A multipart body (at most `max_bytes`, `max_files` file parts and MAX_FORM_FIELDS other fields, all arrived
    by `deadline`): str values for fields, FilePart values for files."""
    body = await read_body(request, max_bytes, uploads, deadline)
    items = simple_form(body, request.headers.get("content-type", ""), max_files, MAX_FORM_FIELDS)
    if items is None:
        items = await parsed_by_starlette(request, body, max_files)
    return FormData(items)


async def parsed_by_starlette(request: Request, body: bytes, max_files: int) -> FormItems:
    """The body's items as Starlette's multipart parser reads them, its files read into FilePart values."""

    async def chunks():
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=max_files, max_fields=MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise ApiError("too_many_images", f"too many images in one request; the limit is {max_files}") from None
        raise ApiError("invalid_multipart", f"malformed multipart body: {exc.message}") from None
    items: FormItems = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            value = FilePart(value.filename or "", await value.read())
        items.append((name, value))
    await form.close()
    return items


def form_image(form: FormData, field: str) -> bytes:
    """The bytes of the file upload in `field`."""
    upload = form.get(field)
    if upload is None:
        raise ApiError("missing_image", f"send the image as a file in the multipart field {field!r}")
    if not isinstance(upload, FilePart):
        raise ApiError("invalid_multipart", f"the multipart field {field!r} must be a file upload")
    return upload.data


def decode_base64(text: str) -> bytes:
    """Standard base64 (an optional data: URL prefix is dropped); the length is checked before decoding."""
    text = DATA_URL_PREFIX.sub("", text, count=1)
    if len(text) % 4:
        raise ApiError(
            "invalid_base64", f"the image is not valid base64: its length {len(text)} is not a multiple of 4"
        )
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:  # binascii.Error, or characters outside ASCII
        raise ApiError("invalid_base64", f"the image is not valid base64: {exc}") from None
