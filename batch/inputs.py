"""Batch scoring inputs: a folder tree, a tar archive, a Parquet file or a list of paths, as a stream of records.

Every source yields `Record`s in a deterministic order (sorted folder walk, archive order, row order, list
order), which is what lets `--resume` skip exactly the inputs already written. A record either carries its
bytes (archive members, Parquet cells), or a path that the decoding worker reads, or an error found while
listing (an unsafe archive member name, a symlinked folder pointing outside the root). The bytes of a path
record are read by `read_bytes`, which also refuses symlinks that leave the input root.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_FILE_BYTES = 64 * 1024 * 1024  # an encoded image larger than this is refused before it is read

# Reasons of inputs that cannot be scored, besides decode_image's (empty, unsupported_format, corrupt, image_too_large).
NOT_FOUND = "not_found"
UNREADABLE = "unreadable"
OUTSIDE_ROOT = "outside_root"
UNSAFE_NAME = "unsafe_name"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "image_too_large"

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
LIST_SUFFIXES = (".txt", ".lst", ".list")


class InputError(Exception):
    """An input that cannot be opened at all (missing, wrong kind, missing column); the message says why."""


class RecordError(Exception):
    """One input that cannot be scored; `reason` goes to the output's error column."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    """One input. Exactly one of `data`, `path` or `error` says where its bytes come from (or why there are none)."""

    id: str  # the output's id: relative path, member name, listed path or the Parquet id value
    data: bytes | None = None
    path: str | None = None
    root: str | None = None  # the folder a resolved `path` must stay in (symlinks); None: anywhere
    error: tuple[str, str] | None = None  # (reason, message)


@dataclass(frozen=True)
class InputSource:
    """A named input: its kind, how many records it has (None if unknown) and a fresh iterator over them."""

    kind: str
    location: str
    count: int | None
    records: Callable[[], Iterator[Record]]


def read_bytes(record: Record) -> bytes:
    """The encoded image of `record`; raises RecordError for listing errors and unreadable or unsafe files."""
    if record.error is not None:
        raise RecordError(*record.error)
    if record.data is not None:
        return record.data
    assert record.path is not None
    real = os.path.realpath(record.path)
    if record.root is not None and not _inside(real, record.root):
        raise RecordError(
            OUTSIDE_ROOT,
            f"{record.path} is a symlink to {real}, outside the input folder; not followed",
        )
    try:
        # stat before open: opening a FIFO or a device would block or read forever.
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode):
            raise RecordError(NOT_A_FILE, f"{record.path} is not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise RecordError(TOO_LARGE, f"{record.path} has {info.st_size} bytes, more than {MAX_FILE_BYTES}")
        with open(real, "rb") as f:
            return f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise RecordError(NOT_FOUND, f"{record.path} does not exist") from None
    except OSError as exc:
        raise RecordError(UNREADABLE, f"{record.path} cannot be read: {exc.strerror or exc}") from None


def open_input(location: str | Path, *, id_column: str = "id", image_column: str = "image") -> InputSource:
    """The source for a folder, a .tar/.tar.gz/.tgz, a .parquet or a .txt list of paths; raises InputError."""
    path = Path(location)
    if not path.exists():
        raise InputError(f"input {location} does not exist")
    if path.is_dir():
        return _folder_source(path)
    name = path.name.lower()
    openers: dict[tuple[str, ...], Callable[[], InputSource]] = {
        ARCHIVE_SUFFIXES: lambda: _archive_source(path),
        PARQUET_SUFFIXES: lambda: _parquet_source(path, id_column, image_column),
        LIST_SUFFIXES: lambda: _list_source(path),
    }
    for suffixes, opener in openers.items():
        if name.endswith(suffixes):
            return opener()
    valid = ", ".join(s for suffixes in openers for s in suffixes)
    raise InputError(f"input {location} is not a folder and has none of the suffixes {valid}")


def _folder_source(root: Path) -> InputSource:
    records = sorted(_walk_folder(root.resolve()), key=lambda r: r.id)
    return InputSource("folder", str(root), len(records), lambda: iter(records))


def _walk_folder(root: Path) -> Iterator[Record]:
    """Every file under `root` (relative ids, in walk order). Symlinked folders are not entered: one pointing
    outside the root becomes an error row, one pointing inside is skipped (its files are listed through the
    real folder). Symlinked files are listed; read_bytes refuses those that point outside the root."""
    root_text = str(root)
    for folder, dir_names, file_names in os.walk(root_text, followlinks=False):
        for name in dir_names:
            path = os.path.join(folder, name)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root_text):
                message = f"{path} is a symlink to a folder outside the input folder; not followed"
                yield Record(_relative(path, root_text), error=(OUTSIDE_ROOT, message))
        for name in file_names:
            path = os.path.join(folder, name)
            yield Record(_relative(path, root_text), path=path, root=root_text)


def _archive_source(path: Path) -> InputSource:
    try:
        with tarfile.open(path, mode="r|*") as archive:
            count = sum(1 for member in archive if not member.isdir())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"input {path} is not a readable tar archive: {exc}") from None
    return InputSource("archive", str(path), count, lambda: _archive_records(path))


def _archive_records(path: Path) -> Iterator[Record]:
    """Members in archive order, read from the stream (never extracted to disk)."""
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if member.isdir():
                continue
            name = member.name
            if not _safe_member_name(name):
                yield Record(
                    name,
                    error=(
                        UNSAFE_NAME,
                        f"archive member name {name!r} is absolute or climbs out (..)",
                    ),
                )
            elif not member.isreg():
                yield Record(
                    name,
                    error=(
                        NOT_A_FILE,
                        f"archive member {name!r} is a link or special file; not followed",
                    ),
                )
            elif member.size > MAX_FILE_BYTES:
                yield Record(
                    name,
                    error=(
                        TOO_LARGE,
                        f"archive member {name!r} has {member.size} bytes, more than {MAX_FILE_BYTES}",
                    ),
                )
            else:
                file = archive.extractfile(member)
                yield Record(name, data=file.read() if file is not None else b"")


def _parquet_source(path: Path, id_column: str, image_column: str) -> InputSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"input {path} is not a readable Parquet file: {exc}") from None
    schema = parquet.schema_arrow
    for column in (id_column, image_column):
        if column not in schema.names:
            raise InputError(f"Parquet input {path} has no column {column!r}; its columns: {', '.join(schema.names)}")
    image_type = schema.field(image_column).type
    if pa.types.is_struct(image_type):  # Hugging Face datasets' Image feature: {"bytes", "path"}
        if image_type.get_field_index("bytes") < 0:
            raise InputError(f"Parquet column {image_column!r} is a struct without a 'bytes' field")
    elif not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise InputError(f"Parquet column {image_column!r} must hold image bytes (binary), not {image_type}")
    count = parquet.metadata.num_rows
    return InputSource("parquet", str(path), count, lambda: _parquet_records(path, id_column, image_column))


def _parquet_records(path: Path, id_column: str, image_column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[id_column, image_column]):
        ids = batch.column(id_column).to_pylist()
        images = batch.column(image_column).to_pylist()
        for row_id, image in zip(ids, images, strict=True):
            if isinstance(image, dict):
                image = image.get("bytes")
            yield Record(str(row_id), data=image if image is not None else b"")


def _list_source(path: Path) -> InputSource:
    """One path per line; blank lines and lines starting with # are skipped; relative paths are relative to
    the list file's folder. Listed paths are read wherever they point (the list is the user's explicit choice)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"input list {path} cannot be read as UTF-8 text: {exc}") from None
    base = path.resolve().parent
    records = [
        Record(line, path=str(base / line))
        for line in (raw.strip() for raw in lines)
        if line and not line.startswith("#")
    ]
    return InputSource("list", str(path), len(records), lambda: iter(records))


def _safe_member_name(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return (
        bool(parts)
        and not name.startswith(("/", "\\"))
        and ".." not in parts
        and ":" not in parts[0]
        and "\x00" not in name
    )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _relative(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()
