"""Batch scoring CLI: every input kind and output format, error rows for bad files, exit codes, import hygiene."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from inference.imaging import decode_image
from inference.runtime import Predictor
from tests.support.batch_files import (
    BAD_FILES,
    LABELS,
    REPO,
    color_files,
    color_png,
    encode_jpeg,
    exit_code,
    make_input,
    read_output,
    run_cli,
    write_folder,
    write_parquet,
)
from tests.support.color_package import COLOR_CLASSES, make_color_package


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_color_package(tmp_path_factory.mktemp("batch") / "color")


@pytest.mark.parametrize("output_name", ["scores.parquet", "scores.csv"])
@pytest.mark.parametrize("kind", ["folder", "tar", "tar.gz", "parquet", "list"])
def test_every_input_kind_scores_every_image_once_with_its_label(package, tmp_path, kind, output_name):
    files = color_files()
    source, ids = make_input(kind, tmp_path, files)
    extra = ["--id-column", "key", "--image-column", "jpeg"] if kind == "parquet" else []
    output = tmp_path / output_name
    rc = run_cli(
        "--model",
        package,
        "--input",
        source,
        "--output",
        output,
        "--top-k",
        2,
        "--workers",
        0,
        *extra,
    )
    assert rc == 0
    rows = read_output(output)
    assert [r["id"] for r in rows] == ids
    for row in rows:
        expected = Path(row["id"]).name.split("-")[0]
        assert row["label_1"] == expected and row["probability_1"] > 0.99
        assert row["label_2"] in COLOR_CLASSES and row["label_2"] != expected
        assert row["probability_1"] > row["probability_2"]
        assert row["error"] is None and row["error_message"] is None
    assert not output.with_name(output.name + ".parts").exists()  # gone once assembled


def test_output_columns_are_documented_flat_columns(package, tmp_path):
    source = write_folder(tmp_path / "images", color_files())
    run_cli(
        "--model",
        package,
        "--input",
        source,
        "--output",
        tmp_path / "s.parquet",
        "--top-k",
        3,
        "--workers",
        0,
    )
    schema = pq.read_schema(tmp_path / "s.parquet")
    assert schema.names == [
        "id",
        "label_1",
        "label_2",
        "label_3",
        "probability_1",
        "probability_2",
        "probability_3",
        "error",
        "error_message",
    ]
    assert schema.field("probability_1").type == pa.float32()


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_decoding_pools_give_the_same_rows_as_inline_decoding(package, tmp_path, pool):
    files = {**color_files(LABELS * 5), **{name: data for name, (data, _) in BAD_FILES.items()}}
    source = write_folder(tmp_path / "images", files)
    common = ["--model", package, "--input", source, "--batch-size", 4, "--allow-failures"]
    assert run_cli(*common, "--output", tmp_path / "inline.parquet", "--workers", 0) == 0
    assert run_cli(*common, "--output", tmp_path / "pool.parquet", "--workers", 2, "--pool", pool) == 0
    assert read_output(tmp_path / "pool.parquet") == read_output(tmp_path / "inline.parquet")


def test_a_chunk_is_decoded_by_every_worker(package, tmp_path, monkeypatch):
    """A chunk of large photos decoded by one worker would leave the others idle: each worker takes a part."""
    import threading
    import time

    import batch.engines.local as local
    from batch.scoring import decode_chunk

    decoded_by: dict[int, list[str]] = {}

    def slow_decode(records, **options):
        time.sleep(0.2)  # long enough that the second part is taken by the idle worker, not the busy one
        decoded_by.setdefault(threading.get_ident(), []).extend(record.id for record in records)
        return decode_chunk(records, **options)

    monkeypatch.setattr(local, "decode_chunk", slow_decode)
    source = write_folder(tmp_path / "images", color_files(LABELS * 2))
    arguments = ["--model", package, "--input", source, "--output", tmp_path / "out.parquet", "--batch-size", 64]
    assert run_cli(*arguments, "--workers", 2, "--pool", "thread") == 0
    parts = [ids for ids in decoded_by.values() if ids]
    assert len(parts) == 2 and sorted(len(ids) for ids in parts) == [len(LABELS)] * 2
    assert len(read_output(tmp_path / "out.parquet")) == 2 * len(LABELS)


def test_split_parts_are_contiguous_and_merge_restores_the_chunk():
    from batch.engines.local import split
    from batch.scoring import DecodedChunk, merge

    assert split(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert split([0], 2) == [[], [0]]
    pixels = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    first = DecodedChunk(["a", "b"], pixels[:1], [None, ("corrupt", "bad")])
    empty = DecodedChunk([], np.empty((0, 2, 2, 3), np.uint8), [])
    second = DecodedChunk(["c"], pixels[1:], [None])
    merged = merge([first, empty, second])
    assert merged.ids == ["a", "b", "c"] and merged.errors == [None, ("corrupt", "bad"), None]
    assert np.array_equal(merged.pixels, pixels)


def test_tf32_switch_changes_nothing_on_the_cpu(package, tmp_path):
    source = write_folder(tmp_path / "images", color_files())
    common = ["--model", package, "--input", source, "--device", "cpu"]
    assert run_cli(*common, "--output", tmp_path / "float32.parquet") == 0
    assert run_cli(*common, "--output", tmp_path / "tf32.parquet", "--tf32") == 0
    assert read_output(tmp_path / "tf32.parquet") == read_output(tmp_path / "float32.parquet")


def test_probabilities_equal_the_services_decode_and_predictor(package, tmp_path):
    """The same decode_image and Predictor as the service: the output holds exactly their numbers."""
    rng = np.random.default_rng(1)
    images = {f"{i}.jpg": encode_jpeg(rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)) for i in range(5)}
    source = write_folder(tmp_path / "images", images)
    run_cli(
        "--model",
        package,
        "--input",
        source,
        "--output",
        tmp_path / "s.parquet",
        "--top-k",
        3,
        "--workers",
        0,
    )
    rows = read_output(tmp_path / "s.parquet")
    # One batch of all five, as the job ran them (batch size 64): ONNX Runtime's sums may differ in the last
    # bits between batch compositions, so the same batch is what must match exactly.
    pixels = np.stack([decode_image(images[row["id"]], (32, 32)) for row in rows])
    expected = Predictor.from_path(package, device="cpu").predict(pixels)
    for row, probabilities in zip(rows, expected, strict=True):
        order = np.argsort(-probabilities, kind="stable")
        assert [row[f"label_{i + 1}"] for i in range(3)] == [COLOR_CLASSES[j] for j in order]
        assert [row[f"probability_{i + 1}"] for i in range(3)] == [float(probabilities[j]) for j in order]


def test_each_kind_of_bad_file_becomes_its_own_error_row(package, tmp_path, capsys):
    files = {**color_files(), **{name: data for name, (data, _) in BAD_FILES.items()}}
    source = write_folder(tmp_path / "images", files)
    output = tmp_path / "scores.csv"
    rc = run_cli("--model", package, "--input", source, "--output", output, "--batch-size", 3, "--workers", 0)
    assert rc == 1  # some inputs failed
    stderr = capsys.readouterr().err
    assert f"scored {len(LABELS)}, failed {len(BAD_FILES)}" in stderr and "images/s" in stderr
    rows = {r["id"]: r for r in read_output(output)}
    assert set(rows) == set(files)
    for name, (_, reason) in BAD_FILES.items():
        assert rows[name]["error"] == reason, name
        assert rows[name]["error_message"] and rows[name]["label_1"] is None and rows[name]["probability_1"] is None
    for name in color_files():
        assert rows[name]["error"] is None and rows[name]["label_1"] == Path(name).name.split("-")[0]
    assert (
        run_cli(
            "--model",
            package,
            "--input",
            source,
            "--output",
            output,
            "--workers",
            0,
            "--allow-failures",
        )
        == 0
    )


def test_archive_members_that_are_unsafe_or_links_are_error_rows(package, tmp_path):
    path = tmp_path / "images.tar"
    with tarfile.open(path, "w") as archive:
        for name in ("ok/red-0.png", "/abs/red-1.png", "../up/red-2.png", "a/../../red-3.png"):
            member = tarfile.TarInfo(name)
            data = color_png("red")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("ok/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    output = tmp_path / "s.parquet"
    assert run_cli("--model", package, "--input", path, "--output", output, "--workers", 0) == 1
    errors = {r["id"]: r["error"] for r in read_output(output)}
    assert errors == {
        "ok/red-0.png": None,
        "/abs/red-1.png": "unsafe_name",
        "../up/red-2.png": "unsafe_name",
        "a/../../red-3.png": "unsafe_name",
        "ok/link.png": "not_a_file",
    }


def test_parquet_null_and_empty_cells_are_error_rows(package, tmp_path):
    source = write_parquet(tmp_path / "in.parquet", {"a": color_png("green"), "b": None, "c": b"", "d": b"xx"})
    output = tmp_path / "s.parquet"
    rc = run_cli(
        "--model",
        package,
        "--input",
        source,
        "--output",
        output,
        "--id-column",
        "key",
        "--image-column",
        "jpeg",
        "--workers",
        "0",
    )
    assert rc == 1
    assert [(r["id"], r["label_1"], r["error"]) for r in read_output(output)] == [
        ("a", "green", None),
        ("b", None, "empty"),
        ("c", None, "empty"),
        ("d", None, "unsupported_format"),
    ]


def test_folder_symlinks_outside_the_root_are_not_followed(package, tmp_path):
    outside = write_folder(tmp_path / "outside", {"secret.png": color_png("red"), "dir/x.png": color_png("red")})
    root = write_folder(tmp_path / "images", {"real/blue-0.png": color_png("blue")})
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "escape_dir").symlink_to(outside / "dir")
    (root / "inside.png").symlink_to(root / "real" / "blue-0.png")
    (root / "inside_dir").symlink_to(root / "real")  # skipped: its files are listed through real/
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    output = tmp_path / "s.parquet"
    assert run_cli("--model", package, "--input", root, "--output", output, "--workers", 0) == 1
    rows = {r["id"]: (r["label_1"], r["error"]) for r in read_output(output)}
    assert rows == {
        # Resolves outside the root as well: refused before any read.
        "dangling.png": (None, "outside_root"),
        "escape.png": (None, "outside_root"),
        "escape_dir": (None, "outside_root"),
        "inside.png": ("blue", None),
        "real/blue-0.png": ("blue", None),
    }


def test_listed_paths_that_are_missing_are_error_rows(package, tmp_path):
    write_folder(tmp_path / "imgs", {"red-0.png": color_png("red")})
    listing = tmp_path / "paths.txt"
    listing.write_text(f"imgs/red-0.png\nimgs/missing.png\n{tmp_path / 'imgs'}\n")
    output = tmp_path / "s.csv"
    assert run_cli("--model", package, "--input", listing, "--output", output, "--workers", 0) == 1
    assert [(r["id"], r["error"]) for r in read_output(output)] == [
        ("imgs/red-0.png", None),
        ("imgs/missing.png", "not_found"),
        (str(tmp_path / "imgs"), "not_a_file"),
    ]


def test_an_empty_folder_gives_an_empty_output(package, tmp_path):
    (tmp_path / "empty").mkdir()
    output = tmp_path / "s.parquet"
    assert run_cli("--model", package, "--input", tmp_path / "empty", "--output", output, "--workers", 0) == 0
    assert pq.read_table(output).num_rows == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--input", "{tmp}/nope", "--output", "{tmp}/o.parquet"], "does not exist"),
        (["--input", "{tmp}/data.json", "--output", "{tmp}/o.parquet"], "none of the suffixes"),
        (
            ["--input", "{tmp}/in", "--output", "{tmp}/o.json"],
            "must end with one of .parquet, .csv",
        ),
        (["--input", "{tmp}/in", "--output", "{tmp}/no/such/dir/o.csv"], "does not exist"),
        (
            ["--input", "{tmp}/in.parquet", "--output", "{tmp}/o.csv", "--id-column", "name"],
            "no column 'name'",
        ),
        (
            ["--input", "{tmp}/in", "--output", "{tmp}/o.csv", "--top-k", "4"],
            "top-k must be between 1 and",
        ),
        (
            ["--input", "{tmp}/in", "--output", "{tmp}/o.csv", "--batch-size", "0"],
            "batch size must be at least 1",
        ),
        (
            ["--input", "{tmp}/in", "--output", "{tmp}/o.csv", "--url", "http://x"],
            "with --url, --model names a model the service serves;",
        ),
        (["--input", "{tmp}/in", "--output", "{tmp}/o.csv", "--engine", "spark"], "invalid choice"),
        (
            ["--input", "{tmp}/in", "--output", "{tmp}/o.csv", "--backend", "torchscript"],
            "has no torchscript model",
        ),
        (["--input", "{tmp}/in"], "required: --output"),
    ],
)
def test_bad_cli_input_is_one_line_and_exit_2(package, tmp_path, capsys, args, words):
    write_folder(tmp_path / "in", color_files())
    write_parquet(tmp_path / "in.parquet", {"a": color_png("red")})
    (tmp_path / "data.json").write_text("{}")
    rc = exit_code("--model", package, *[a.format(tmp=tmp_path) for a in args])
    stderr = capsys.readouterr().err
    assert rc == 2
    assert stderr.startswith("visionserve-batch: error:") and words in stderr and stderr.count("\n") == 1, stderr


def test_a_missing_or_tampered_package_is_exit_2(package, tmp_path, capsys):
    write_folder(tmp_path / "in", color_files())
    assert (
        run_cli(
            "--model",
            tmp_path / "nopkg",
            "--input",
            tmp_path / "in",
            "--output",
            tmp_path / "o.csv",
        )
        == 2
    )
    assert "not a model package" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_imports_no_training_export_or_torch_code(package, tmp_path):
    source = write_folder(tmp_path / "images", color_files())
    script = (
        "import sys; from batch.cli import main; "
        f"rc = main(['--model', {str(package)!r}, '--input', {str(source)!r}, '--output', {str(tmp_path / 's.csv')!r}]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'training', 'export', 'torch', 'torchvision'})); "
        "sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(read_output(tmp_path / "s.csv")) == len(LABELS)


def test_progress_bar_shows_rate_and_eta(package, tmp_path, capsys):
    source = write_folder(tmp_path / "images", color_files())
    output = tmp_path / "s.csv"
    assert run_cli("--model", package, "--input", source, "--output", output, "--progress", "--workers", 0) == 0
    bar = capsys.readouterr().err
    assert "scoring: 100%" in bar and "6/6" in bar and "img/s" in bar and "<00:00" in bar
