"""The work the local and Ray engines share: read + decode a chunk of records, and turn probabilities into rows.

Kept free of ONNX Runtime, pyarrow and Ray so that decoding worker processes start fast and stay small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from batch.inputs import Record, RecordError, read_bytes
from inference.imaging import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

if TYPE_CHECKING:
    from inference.runtime import Predictor


class ScoreRow(NamedTuple):
    """One output row: the top-k labels and probabilities, best first, or an error reason and message."""

    id: str
    labels: tuple[str, ...]  # empty when error is set
    probabilities: tuple[float, ...]
    error: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class DecodedChunk:
    """A chunk of records after decoding: the images that decoded, stacked, and the errors of the others."""

    ids: list[str]
    pixels: np.ndarray  # (n_decoded, H, W, 3) uint8, in record order, skipping failed records
    errors: list[tuple[str, str] | None]  # per record: None if its pixels are in `pixels`, else (reason, message)


def decode_chunk(
    records: Sequence[Record], size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedChunk:
    """Read and decode every record with the service's decode_image; one bad record never affects the others."""
    images: list[np.ndarray] = []
    errors: list[tuple[str, str] | None] = []
    for record in records:
        try:
            images.append(decode_image(read_bytes(record), size, max_pixels=max_pixels))
            errors.append(None)
        except (RecordError, ImageDecodeError) as exc:
            errors.append((exc.reason, str(exc)))
        except Exception as exc:  # a decoder bug on a hostile file must not stop the job
            errors.append(("corrupt", f"decoding failed: {type(exc).__name__}: {exc}"))
    pixels = np.stack(images) if images else np.empty((0, *size, 3), dtype=np.uint8)
    return DecodedChunk([r.id for r in records], pixels, errors)


def merge(chunks: Sequence[DecodedChunk]) -> DecodedChunk:
    """Consecutive decoded chunks as one, in order."""
    return DecodedChunk(
        [record_id for chunk in chunks for record_id in chunk.ids],
        np.concatenate([chunk.pixels for chunk in chunks]),
        [error for chunk in chunks for error in chunk.errors],
    )


def top_k_rows(chunk: DecodedChunk, probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[ScoreRow]:
    """Rows in record order; `probabilities` (n_decoded, C) float32 belongs to chunk.pixels row by row."""
    # Stable argsort of the negated probabilities: tied classes keep their class order.
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    rows: list[ScoreRow] = []
    scored = 0
    for row_id, error in zip(chunk.ids, chunk.errors, strict=True):
        if error is None:
            indices = best[scored]
            labels = tuple(class_names[i] for i in indices)
            rows.append(ScoreRow(row_id, labels, tuple(float(p) for p in probabilities[scored, indices])))
            scored += 1
        else:
            rows.append(ScoreRow(row_id, (), (), *error))
    return rows


def score_chunk(predictor: Predictor, chunk: DecodedChunk, k: int) -> list[ScoreRow]:
    """Run the decoded images of `chunk` through `predictor`: its rows, errors included, in record order."""
    spec = predictor.spec
    if len(chunk.pixels):
        probabilities = predictor.predict(chunk.pixels)
    else:  # every record of the chunk failed
        probabilities = np.empty((0, spec.num_classes), dtype=np.float32)
    return top_k_rows(chunk, probabilities, spec.class_names, k)
