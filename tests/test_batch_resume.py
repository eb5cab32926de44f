"""Batch output: nothing lost, nothing twice. Atomic parts, --resume after SIGKILL, refusals of a mismatched resume."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.inputs import Record
from batch.output import ChunkedOutput, OutputError
from batch.scoring import ScoreRow
from tests.support.batch_files import (
    LABELS,
    REPO,
    color_files,
    exit_code,
    read_output,
    run_cli,
    write_folder,
)
from tests.support.color_package import make_color_package

JOB = {"input": "/data", "input_kind": "folder", "model": {"name": "m"}, "top_k": 1}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_color_package(tmp_path_factory.mktemp("resume") / "color")


def rows(ids: list[str]) -> list[ScoreRow]:
    return [ScoreRow(i, ("red",), (0.9,)) for i in ids]


def test_parts_are_consecutive_runs_and_a_resume_skips_exactly_them(tmp_path):
    output = tmp_path / "s.parquet"
    first = ChunkedOutput(output, JOB, top_k=1, rows_per_part=2, resume=False)
    # One part of two rows is written, "c" stays buffered.
    first.add(rows(["a", "b", "c"]))
    assert sorted(p.name for p in first.parts_dir.iterdir()) == [
        "part-000000.parquet",
        "state.json",
    ]
    # What a kill in the middle of a part's write leaves behind.
    (first.parts_dir / "part-000001.parquet.tmp").write_bytes(b"half a write")

    second = ChunkedOutput(output, JOB, top_k=1, rows_per_part=2, resume=True)
    assert second.done_ids == ["a", "b"]
    assert not list(second.parts_dir.glob("*.tmp"))
    records = [Record(i, data=b"") for i in "abcde"]
    remaining = list(second.remaining(records))
    assert [r.id for r in remaining] == ["c", "d", "e"]
    second.add(rows([r.id for r in remaining]))
    assert second.finish() == (5, 0)
    assert [r["id"] for r in read_output(output)] == list("abcde")
    assert not second.parts_dir.exists()


def test_an_unfinished_output_is_not_overwritten_without_resume(tmp_path):
    output = tmp_path / "s.csv"
    ChunkedOutput(output, JOB, top_k=1, rows_per_part=2, resume=False).add(rows(["a", "b"]))
    with pytest.raises(OutputError, match="pass --resume"):
        ChunkedOutput(output, JOB, top_k=1, rows_per_part=2, resume=False)


def test_abandon_removes_only_a_parts_folder_without_parts(tmp_path):
    nothing_written = ChunkedOutput(tmp_path / "a.csv", JOB, top_k=1, rows_per_part=2, resume=False)
    nothing_written.add(rows(["a"]))  # buffered, not yet a part
    nothing_written.abandon()
    assert not nothing_written.parts_dir.exists()  # the same command can run again without --resume
    one_part = ChunkedOutput(tmp_path / "b.csv", JOB, top_k=1, rows_per_part=2, resume=False)
    one_part.add(rows(["a", "b"]))
    one_part.abandon()
    assert ChunkedOutput(tmp_path / "b.csv", JOB, top_k=1, rows_per_part=2, resume=True).done_ids == ["a", "b"]


def test_a_resume_of_a_different_job_is_refused(tmp_path):
    output = tmp_path / "s.csv"
    ChunkedOutput(output, JOB, top_k=1, rows_per_part=2, resume=False)
    with pytest.raises(OutputError, match="different job.*model, top_k"):
        ChunkedOutput(
            output,
            {**JOB, "top_k": 2, "model": {"name": "n"}},
            top_k=2,
            rows_per_part=2,
            resume=True,
        )


def test_a_resume_of_a_changed_input_is_refused(tmp_path):
    output = tmp_path / "s.csv"
    ChunkedOutput(output, JOB, top_k=1, rows_per_part=1, resume=False).add(rows(["a", "b"]))
    resumed = ChunkedOutput(output, JOB, top_k=1, rows_per_part=1, resume=True)
    with pytest.raises(OutputError, match="input changed.*input 1 was 'b', now 'x'"):
        list(resumed.remaining([Record("a", data=b""), Record("x", data=b"")]))


def test_a_parts_folder_without_state_is_discarded_on_resume(tmp_path):
    output = tmp_path / "s.csv"
    (tmp_path / "s.csv.parts").mkdir()  # killed between mkdir and writing state.json
    (tmp_path / "s.csv.parts" / "part-000000.parquet").write_bytes(b"stale")
    assert ChunkedOutput(output, JOB, top_k=1, rows_per_part=1, resume=True).done_ids == []
    assert json.loads((tmp_path / "s.csv.parts" / "state.json").read_text()) == JOB


def test_cli_refuses_to_resume_with_other_arguments(package, tmp_path, capsys):
    source = write_folder(tmp_path / "in", color_files())
    output = tmp_path / "s.parquet"
    ChunkedOutput(output, {"input": "elsewhere"}, top_k=1, rows_per_part=1, resume=False)
    assert exit_code("--model", package, "--input", source, "--output", output, "--resume") == 2
    assert "different job" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
def test_resume_after_sigkill_at_random_moments_lists_every_input_exactly_once(package, tmp_path):
    files = color_files(LABELS * 40)  # 240 images
    source = write_folder(tmp_path / "images", files)
    output = tmp_path / "scores.parquet"
    parts = tmp_path / "scores.parquet.parts"
    # Batch size 1 and one row per part: hundreds of atomic writes, so a kill lands mid-run.
    command = [
        sys.executable, "-m", "batch", "--model", str(package), "--input", str(source),
        "--output", str(output), "--batch-size", "1", "--rows-per-part", "1", "--workers", "1", "--resume",
    ]  # fmt: skip
    rng = random.Random(0)
    kills_mid_run = 0
    for _ in range(3):
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        written = len(list(parts.glob("part-*.parquet"))) if parts.is_dir() else 0
        target = written + rng.randint(5, 60)  # parts to wait for before the kill
        while time.monotonic() < deadline and process.poll() is None:
            if parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not output.exists():
            kills_mid_run += 1
    assert kills_mid_run == 3, "a run finished before its kill: the test did not interrupt it"
    assert parts.is_dir()

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "from an earlier run" in done.stderr
    result = read_output(output)
    assert [r["id"] for r in result] == sorted(files)  # every input, once, in order
    assert all(r["label_1"] == Path(r["id"]).name.split("-")[0] and r["error"] is None for r in result)
    assert not parts.exists()


def test_a_finished_job_rerun_with_resume_starts_afresh(package, tmp_path):
    source = write_folder(tmp_path / "in", color_files())
    output = tmp_path / "s.csv"
    assert run_cli("--model", package, "--input", source, "--output", output, "--workers", 0) == 0
    assert run_cli("--model", package, "--input", source, "--output", output, "--workers", 0, "--resume") == 0
    assert len(read_output(output)) == len(LABELS)
