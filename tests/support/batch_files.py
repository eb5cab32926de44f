"""Batch scoring test inputs: colour images in every input kind, bad files with their expected reasons, and the CLI
run in-process."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image

from batch.cli import main
from inference.imaging import encode_png
from tests.support.color_package import color_pixels

REPO = Path(__file__).resolve().parents[2]
LABELS = ("red", "green", "blue", "blue", "red", "green")  # six images, two per class


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="GIF")
    return buffer.getvalue()


_noise = np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8)
# A header claiming 100000 x 100000 pixels and no data: refused from the header, never decoded.
HUGE_PNG = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
BAD_FILES = {  # file name -> (bytes, the error reason expected in the output)
    "empty.png": (b"", "empty"),
    "truncated.png": (encode_png(_noise)[:300], "corrupt"),
    "truncated.jpg": (encode_jpeg(_noise)[:400], "corrupt"),
    "huge.png": (HUGE_PNG + _png_chunk(b"IEND", b""), "image_too_large"),
    "garbage.png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "unsupported_format"),
    "notes.txt": (b"not an image at all", "unsupported_format"),
    "animation.gif": (_gif(), "unsupported_format"),
}


def color_png(label: str) -> bytes:
    return encode_png(color_pixels(label)[0])


def color_files(labels=LABELS) -> dict[str, bytes]:
    """Relative path -> PNG bytes; the colour package labels each file by the word before the dash."""
    return {f"{'nested/' if i % 2 else ''}{label}-{i}.png": color_png(label) for i, label in enumerate(labels)}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return root


def write_archive(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def write_parquet(path: Path, files: dict[str, bytes | None]) -> Path:
    table = pa.table({"key": list(files), "jpeg": pa.array(list(files.values()), pa.binary())})
    pq.write_table(table, path)
    return path


def write_list(path: Path, folder: Path, files: dict[str, bytes]) -> Path:
    """Relative entries (to the list's folder), a comment and a blank line."""
    write_folder(folder, files)
    lines = ["# images to score", ""] + [str((folder / name).relative_to(path.parent)) for name in files]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_input(kind: str, tmp: Path, files: dict[str, bytes]) -> tuple[Path, list[str]]:
    """The input of `kind` holding `files`, and the ids the output must list, in order."""
    builders = {
        "folder": lambda: (write_folder(tmp / "images", files), sorted(files)),
        "tar": lambda: (write_archive(tmp / "images.tar", files), list(files)),
        "tar.gz": lambda: (write_archive(tmp / "images.tar.gz", files), list(files)),
        "parquet": lambda: (write_parquet(tmp / "images.parquet", files), list(files)),
        "list": lambda: (
            write_list(tmp / "list.txt", tmp / "listed", files),
            [f"listed/{n}" for n in files],
        ),
    }
    return builders[kind]()


def read_output(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    else:  # the CSV writer leaves nulls empty (and quotes every string), as pandas.read_csv expects
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
    return table.to_pylist()


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def exit_code(*args: str | Path) -> int:
    """run_cli's exit status, also when argparse exits (SystemExit) on a bad flag."""
    try:
        return run_cli(*args)
    except SystemExit as exc:
        return int(exc.code)
