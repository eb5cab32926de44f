"""Multipart form bodies: the shape every common client sends is split in one pass, any other by Starlette's parser.

Browsers, curl, requests and httpx send each part with a `Content-Disposition: form-data; name="..."` header (and
`; filename="..."` for a file) and at most a `Content-Type`, between boundaries of plain token characters. Such a
body is cut on its delimiter with bytes methods here; python-multipart's callback per header, value and chunk
cost more than decoding a CIFAR-sized JPEG. Anything else (a preamble, padding after a boundary, other part
headers, escaped or extended parameters, a charset, a part or count over the limits) makes `simple_form` answer
None, and Starlette's parser reads the body as before, with its errors. For every body `simple_form` takes, both
give the same fields (tests/test_multipart.py compares them on generated bodies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 2046's boundary characters without the space, 1-70 of them; a quoted boundary goes to Starlette's parser.
CONTENT_TYPE = re.compile(rb"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,./:=?-]{1,70})", re.IGNORECASE)
DISPOSITION = re.compile(rb'form-data; name="([^"\\\r\n]*)"(?:; filename="([^"\\\r\n]*)")?')
PRINTABLE = re.compile(rb"[\x20-\x7e]*")
# Starlette's default limit on one non-file part; a larger field is refused there, so it is left to it.
MAX_FIELD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FilePart:
    """A file part of a form: its filename (as sent, possibly empty) and its bytes."""

    filename: str
    data: bytes


FormItems = list[tuple[str, "str | FilePart"]]


def simple_form(body: bytes, content_type: str, max_files: int, max_fields: int) -> FormItems | None:
    """The (name, value) items of a multipart body in the common shape, in order (values: str for a field,
    FilePart for a file), or None for any other body."""
    match = CONTENT_TYPE.fullmatch(content_type.encode("latin-1", "replace"))
    if match is None:
        return None
    delimiter = b"--" + match.group(1)
    if not body.startswith(delimiter + b"\r\n"):
        return None
    *parts, closing = body[len(delimiter) + 2 :].split(b"\r\n" + delimiter)
    if not parts or closing not in (b"--", b"--\r\n"):
        return None
    items: FormItems = []
    files = fields = 0
    for index, part in enumerate(parts):
        if index:  # every delimiter but the first is followed by CRLF, then the part
            if not part.startswith(b"\r\n"):
                return None
            part = part[2:]
        item = simple_part(part)
        if item is None:
            return None
        if isinstance(item[1], FilePart):
            files += 1
        else:
            fields += 1
            if len(part) > MAX_FIELD_BYTES:
                return None
        if files > max_files or fields > max_fields:
            return None
        items.append(item)
    return items


def simple_part(part: bytes) -> tuple[str, str | FilePart] | None:
    """One part's (name, value): a Content-Disposition header, at most a Content-Type, a blank line, the data."""
    head, blank, data = part.partition(b"\r\n\r\n")
    if not blank:
        return None
    disposition = None
    names = set()
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b": ")
        name = name.lower()
        if not colon or name in names or not PRINTABLE.fullmatch(value):
            return None
        names.add(name)
        if name == b"content-disposition":
            disposition = DISPOSITION.fullmatch(value)
            if disposition is None:
                return None
        elif name != b"content-type":
            return None
    if disposition is None:
        return None
    field, filename = disposition.groups()
    if filename is not None:
        return decoded(field), FilePart(decoded(filename), data)
    return decoded(field), decoded(data)


def decoded(raw: bytes) -> str:
    """UTF-8, else Latin-1: Starlette's decoding of names, filenames and fields when no charset is sent."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
