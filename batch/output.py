"""Batch scoring output: rows written in atomic Parquet parts, resumable after a kill, assembled atomically at the end.

Layout while a job runs (OUTPUT = scores.parquet or scores.csv):

    scores.parquet.parts/state.json          the job (input, model, top-k, format); written once, atomically
    scores.parquet.parts/part-000000.parquet rows 0..n0-1 of the input order, then part-000001 ..., each
                                             written to a .tmp file, fsynced and renamed into place

Parts hold consecutive runs of the input order, so after a SIGKILL at any moment the rows already written
are exactly the first N inputs: `--resume` checks that the input still starts with those N ids and scores
the rest. At the end the parts are streamed into OUTPUT's temp file, which is renamed over OUTPUT; then the
parts folder is removed, state.json first (a kill before that leaves parts that a resume assembles again;
a kill after it leaves a folder without a state, which a resume discards and scores afresh).

Columns (the same in Parquet and CSV): id, label_1 .. label_k, probability_1 .. probability_k (best first;
null on error rows), error (null when scored, else the reason: decode_image's empty / unsupported_format /
corrupt / image_too_large, or not_found / unreadable / outside_root / unsafe_name / not_a_file, or the service's
code in --url mode), error_message (a human-readable sentence).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from batch.inputs import Record
from batch.scoring import ScoreRow
from inference.files import atomic_write

STATE_NAME = "state.json"
PART_GLOB = "part-*.parquet"
OUTPUT_FORMATS = (".parquet", ".csv")


class OutputError(Exception):
    """The output cannot be written or resumed as asked; the message says why and what to do."""


def output_schema(k: int) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False)]
    fields += [pa.field(f"label_{i}", pa.string()) for i in range(1, k + 1)]
    fields += [pa.field(f"probability_{i}", pa.float32()) for i in range(1, k + 1)]
    fields += [pa.field("error", pa.string()), pa.field("error_message", pa.string())]
    return pa.schema(fields)


def check_output_path(output: Path) -> None:
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise OutputError(f"output {output} must end with one of {', '.join(OUTPUT_FORMATS)}")
    if not output.parent.is_dir():
        raise OutputError(f"the folder of output {output} does not exist")
    if output.is_dir():
        raise OutputError(f"output {output} is a folder")


class ChunkedOutput:
    """Buffers rows, writes them as atomic parts of `rows_per_part` rows, and assembles OUTPUT in `finish`."""

    def __init__(self, output: Path, job: dict[str, Any], *, top_k: int, rows_per_part: int, resume: bool) -> None:
        check_output_path(output)
        self.output = output
        self.parts_dir = output.with_name(output.name + ".parts")
        self.schema = output_schema(top_k)
        self.top_k = top_k
        self.rows_per_part = rows_per_part
        self._buffer: list[ScoreRow] = []
        # The ids of the rows that earlier runs wrote, in input order.
        self.done_ids = self._open(job, resume)
        self._next_part = len(self._parts())

    def _open(self, job: dict[str, Any], resume: bool) -> list[str]:
        state_path = self.parts_dir / STATE_NAME
        if self.parts_dir.exists():
            if not resume:
                raise OutputError(
                    f"{self.parts_dir} holds an unfinished run of this output; pass --resume to complete it, "
                    "or delete that folder to start again"
                )
            if state_path.is_file():
                started = json.loads(state_path.read_text(encoding="utf-8"))
                if started != job:
                    changed = sorted(key for key in set(started) | set(job) if started.get(key) != job.get(key))
                    raise OutputError(
                        f"{self.parts_dir} was started by a different job ({', '.join(changed)} differ); "
                        "run it with the same arguments or delete that folder"
                    )
                for leftover in self.parts_dir.glob("*.tmp"):  # a write the kill interrupted
                    leftover.unlink()
                return [i for part in self._parts() for i in pq.read_table(part, columns=["id"])["id"].to_pylist()]
            shutil.rmtree(self.parts_dir)  # killed before the state was written: nothing to keep
        self.parts_dir.mkdir()
        with atomic_write(state_path, "w") as f:
            f.write(json.dumps(job, indent=2))
        return []

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob(PART_GLOB))

    def abandon(self) -> None:
        """After a failure: if no run has written a part yet, remove the parts folder (it holds only the job's
        state), so that the same command can simply be run again without --resume."""
        if self.parts_dir.is_dir() and not self._parts():
            shutil.rmtree(self.parts_dir)

    def remaining(self, records: Iterable[Record]) -> Iterator[Record]:
        """The records after those already written, checking that the input still starts with the same ids."""
        iterator = iter(records)
        for position, done_id in enumerate(self.done_ids):
            record = next(iterator, None)
            if record is None or record.id != done_id:
                found = "its end" if record is None else repr(record.id)
                raise OutputError(
                    f"the input changed since the unfinished run: input {position} was {done_id!r}, now {found}; "
                    f"delete {self.parts_dir} to start again"
                )
        yield from iterator

    def add(self, rows: Iterable[ScoreRow]) -> None:
        self._buffer.extend(rows)
        while len(self._buffer) >= self.rows_per_part:
            self._write_part(self._buffer[: self.rows_per_part])
            del self._buffer[: self.rows_per_part]

    def finish(self) -> tuple[int, int]:
        """Write the last part, assemble OUTPUT atomically, remove the parts; returns (scored, failed) in all."""
        if self._buffer:
            self._write_part(self._buffer)
            self._buffer = []
        failed = total = 0
        writer_class = pq.ParquetWriter if self.output.suffix.lower() == ".parquet" else pa_csv.CSVWriter
        with atomic_write(self.output) as f, writer_class(f, self.schema) as writer:
            for part in self._parts():
                table = pq.read_table(part, schema=self.schema)
                writer.write_table(table)
                total += table.num_rows
                failed += table.num_rows - table["error"].null_count
        # The state goes first: a kill during the removal then leaves a folder that a resume discards.
        (self.parts_dir / STATE_NAME).unlink()
        shutil.rmtree(self.parts_dir)
        return total - failed, failed

    def _write_part(self, rows: list[ScoreRow]) -> None:
        table = rows_to_table(rows, self.schema, self.top_k)
        path = self.parts_dir / f"part-{self._next_part:06d}.parquet"
        with atomic_write(path) as f:
            pq.write_table(table, f)
        self._next_part += 1


def rows_to_table(rows: list[ScoreRow], schema: pa.Schema, k: int) -> pa.Table:
    columns: dict[str, list[Any]] = {"id": [r.id for r in rows]}
    for i in range(k):
        columns[f"label_{i + 1}"] = [r.labels[i] if i < len(r.labels) else None for r in rows]
    for i in range(k):
        columns[f"probability_{i + 1}"] = [r.probabilities[i] if i < len(r.probabilities) else None for r in rows]
    columns["error"] = [r.error for r in rows]
    columns["error_message"] = [r.message for r in rows]
    return pa.table(columns, schema=schema)
