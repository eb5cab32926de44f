"""service.multipart: the common form shape parsed in one pass, with the same fields as Starlette's parser."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from service.errors import ApiError
from service.multipart import MAX_FIELD_BYTES, FilePart, simple_form
from service.request_reading import MAX_FORM_FIELDS, parsed_by_starlette

BOUNDARY = "----form-7MA4YWxk"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MAX_FILES, MAX_FIELDS = 2, MAX_FORM_FIELDS


def starlette_items(body: bytes, content_type: str, max_files: int = MAX_FILES):
    """The service's reading of the body by Starlette's parser (its fallback); None where it refuses the body."""
    request = Request({"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]})
    try:
        return asyncio.run(parsed_by_starlette(request, body, max_files))
    except ApiError:
        return None


def part(headers: list[str], data: bytes) -> bytes:
    return "".join(f"{h}\r\n" for h in headers).encode() + b"\r\n" + data


def form(*parts: bytes, boundary: str = BOUNDARY, closing: bytes = b"--\r\n") -> bytes:
    delimiter = f"--{boundary}".encode()
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + closing


def test_what_http_clients_send_is_read_in_one_pass_with_starlettes_fields():
    request = httpx.Request(
        "POST",
        "http://x/classify",
        files={"image": ("cat.jpg", b"\xff\xd8 jpeg \r\n--not-a-boundary\r\n\xff\xd9", "image/jpeg")},
        data={"top_k": "3", "model": "résnet"},
    )
    body, content_type = request.read(), request.headers["content-type"]
    items = simple_form(body, content_type, MAX_FILES, MAX_FIELDS)
    assert items is not None and items == starlette_items(body, content_type)
    assert dict(items)["image"] == FilePart("cat.jpg", b"\xff\xd8 jpeg \r\n--not-a-boundary\r\n\xff\xd9")
    assert dict(items)["model"] == "résnet"


def test_curl_and_browser_shapes_are_taken():
    image = part(['Content-Disposition: form-data; name="image"; filename="a b.png"', "Content-Type: image/png"], b"P")
    blank = part(['Content-Disposition: form-data; name="images"; filename=""'], b"")
    for body in (form(image), form(image, closing=b"--"), form(image, blank)):
        assert simple_form(body, CONTENT_TYPE, MAX_FILES, MAX_FIELDS) == starlette_items(body, CONTENT_TYPE)
    assert simple_form(form(image, blank), CONTENT_TYPE, MAX_FILES, MAX_FIELDS)[1] == ("images", FilePart("", b""))


IMAGE = part(['Content-Disposition: form-data; name="image"; filename="a.jpg"'], b"data")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"preamble\r\n" + form(IMAGE), CONTENT_TYPE),
        (form(IMAGE), f'multipart/form-data; boundary="{BOUNDARY}"'),
        (form(IMAGE), f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1"),
        (form(IMAGE, closing=b"--\r\nepilogue"), CONTENT_TYPE),
        (form(IMAGE).replace(f"--{BOUNDARY}\r\n".encode(), f"--{BOUNDARY}  \r\n".encode(), 1), CONTENT_TYPE),
        (form(part(['Content-Disposition: form-data; name="image"; filename*=UTF-8\'\'a.jpg'], b"x")), CONTENT_TYPE),
        (form(part(['Content-Disposition: form-data; name="image"; filename="C:\\\\a.jpg"'], b"x")), CONTENT_TYPE),
        (form(part(['Content-Disposition: form-data; name="image"', "Content-Transfer-Encoding: base64"], b"x")),
         CONTENT_TYPE),
        (form(part(['Content-Disposition: form-data; name="a"', 'Content-Disposition: form-data; name="b"'], b"x")),
         CONTENT_TYPE),
        (form(part(["Content-Type: image/jpeg"], b"x")), CONTENT_TYPE),
        (form(IMAGE, IMAGE, IMAGE), CONTENT_TYPE),  # more files than allowed: Starlette's own error
        (form(*[part([f'Content-Disposition: form-data; name="f{i}"'], b"1") for i in range(MAX_FIELDS + 1)]), CONTENT_TYPE),
        (form(part(['Content-Disposition: form-data; name="big"'], b"x" * (MAX_FIELD_BYTES + 1))), CONTENT_TYPE),
        (form(IMAGE)[:-4], CONTENT_TYPE),  # no closing delimiter
        (b"", CONTENT_TYPE),
    ],
    ids=[
        "preamble", "quoted-boundary", "charset", "epilogue", "padding", "extended-filename", "backslash",
        "other-header", "two-dispositions", "no-disposition", "too-many-files", "too-many-fields", "big-field",
        "truncated", "empty",
    ],
)  # fmt: skip
def test_any_other_shape_is_left_to_starlette(body, content_type):
    assert simple_form(body, content_type, MAX_FILES, MAX_FIELDS) is None


# Pieces of bodies, common and odd, that a client or an attacker could put together.
NAMES = st.sampled_from(["image", "images", "top_k", "", "a;b", 'q"uote', "é", "x y"])
HEADER_NAMES = st.sampled_from(["Content-Disposition", "content-disposition", "CONTENT-DISPOSITION", "Content-Type"])
DISPOSITIONS = st.one_of(
    st.builds(lambda n: f'form-data; name="{n}"', NAMES),
    st.builds(lambda n, f: f'form-data; name="{n}"; filename="{f}"', NAMES, NAMES),
    st.builds(lambda n, f: f"form-data; name={n}; filename={f}", NAMES, NAMES),
    st.builds(lambda n: f'form-data;name="{n}"', NAMES),
    st.builds(lambda n: f'attachment; name="{n}"', NAMES),
)
DATA = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"\r\n", b"\r\n\r\n", f"\r\n--{BOUNDARY}".encode(), f"\r\n--{BOUNDARY}x".encode(), b"--"]),
)


SAFE_NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'), max_size=8)


@st.composite
def common_bodies(draw):
    """Bodies in the shape clients send: one or two files and up to three fields, any names and bytes."""
    parts = []
    for index in range(draw(st.integers(1, MAX_FILES + MAX_FIELDS))):
        name = draw(SAFE_NAMES)
        if index < MAX_FILES and draw(st.booleans()):
            headers = [f'Content-Disposition: form-data; name="{name}"; filename="{draw(SAFE_NAMES)}"']
            headers += draw(st.sampled_from([[], ["Content-Type: image/jpeg"], ["content-type: application/x"]]))
        else:
            headers = [f'Content-Disposition: form-data; name="{name}"']
        # A client picks a boundary that its data does not hold.
        parts.append(part(headers, draw(DATA.filter(lambda data: f"\r\n--{BOUNDARY}".encode() not in data))))
    files = sum(b"filename=" in p.split(b"\r\n\r\n")[0] for p in parts)
    if files > MAX_FILES or len(parts) - files > MAX_FIELDS:
        parts = parts[:1]
    return form(*parts, closing=draw(st.sampled_from([b"--\r\n", b"--"])))


@st.composite
def odd_bodies(draw):
    """Bodies put together from odd pieces: rarely in the common shape."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        headers = []
        for _ in range(draw(st.integers(0, 3))):
            name = draw(HEADER_NAMES)
            value = draw(DISPOSITIONS) if "disposition" in name.lower() else draw(st.sampled_from(["image/jpeg", ""]))
            separator = draw(st.sampled_from([": ", ":", ":  "]))
            headers.append(f"{name}{separator}{value}")
        parts.append(part(headers, draw(DATA)))
    body = form(*parts, closing=draw(st.sampled_from([b"--\r\n", b"--", b"--\r\nafter", b"\r\n", b""])))
    if draw(st.booleans()):  # cut or spliced anywhere
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"", b"\r\n", b"-", b"\n"])) + body[at + draw(st.integers(0, 3)) :]
    return body


@st.composite
def mutated_bodies(draw):
    """A common body with a few bytes cut, inserted or replaced: often still taken, sometimes wrongly."""
    body = draw(common_bodies())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body)))
        piece = draw(st.sampled_from([b"", b"\r\n", b"\n", b"-", b" ", b'"', b";", b"\\", b":", b"=", b"\r\n\r\n"]))
        body = body[:at] + piece + body[at + draw(st.integers(0, 3)) :]
    return body


@settings(max_examples=300, deadline=None)
@given(body=common_bodies())
def test_every_common_body_is_taken_in_one_pass_with_starlettes_fields(body):
    items = simple_form(body, CONTENT_TYPE, MAX_FILES, MAX_FIELDS)
    assert items is not None
    assert items == starlette_items(body, CONTENT_TYPE)


@settings(max_examples=400, deadline=None)
@given(body=st.one_of(mutated_bodies(), odd_bodies()))
def test_every_body_taken_in_one_pass_reads_as_starlette_reads_it(body):
    items = simple_form(body, CONTENT_TYPE, MAX_FILES, MAX_FIELDS)
    if items is not None:
        assert items == starlette_items(body, CONTENT_TYPE)
