"""Benchmark scripts still run end to end, on tiny data and timings (their figures are not checked here)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_export_formats_benchmark_writes_its_table(tmp_path, image_tree_factory):
    data = image_tree_factory(tmp_path / "data", CIFAR10_CLASSES, {"train": 2, "test": 2}, size=(32, 32))
    out = tmp_path / "export_formats.md"
    command = [
        sys.executable, str(REPO / "benchmarks" / "export_formats.py"), "--models", "simple_cnn",
        "--data", str(data), "--eval-limit", "20", "--parity-images", "8", "--batches", "1,3",
        "--seconds", "0.02", "--rounds", "1", "--threads", "1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    for row in ("| PyTorch eager |", "| TorchScript |", "| ONNX fp32 |", "| ONNX int8 (QDQ) |"):
        assert row in table


@pytest.mark.slow
def test_gpu_check_reports_the_cpu_fallback(tmp_path, image_tree_factory, tar_archive_factory):
    from benchmarks.gpu_check import main
    from tests.support.color_package import COLOR_CLASSES, make_color_package

    package = make_color_package(tmp_path / "package")
    tree = image_tree_factory(tmp_path / "data", COLOR_CLASSES, {"test": 3}, size=(32, 32), suffix=".jpg")
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz")
    out = tmp_path / "gpu_check.md"
    argv = [
        "--package", str(package), "--data", str(archive), "--images", "9", "--batch-sizes", "1,4",
        "--seconds", "0.01", "--rounds", "1", "--concurrency", "4", "--no-batch-job", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = out.read_text()
    # No GPU in CI: device=auto runs on the CPU and says why; every request got its own image's answer.
    assert "| ONNX Runtime, device=auto | cpu | CPUExecutionProvider | False | CUDAExecutionProvider" in report
    assert report.count("| 0 of 9 |") == 2


def test_random_package_is_exported_once_then_reused(tmp_path, image_tree_factory):
    from benchmarks.random_weights import random_package

    data = image_tree_factory(tmp_path / "data", CIFAR10_CLASSES, {"train": 1, "test": 2}, size=(32, 32))
    package, run = random_package(tmp_path / "cache", "simple_cnn", CIFAR10_CLASSES, data, "--eval-limit", "10")
    manifest = json.loads((package / "manifest.json").read_text())
    assert (manifest["name"], manifest["spec"]["arch"]) == ("random-simple-cnn", "simple_cnn")
    assert tuple(manifest["spec"]["class_names"]) == CIFAR10_CLASSES
    assert (run / "checkpoint.pt").is_file()
    written = (package / "manifest.json").stat().st_mtime_ns
    assert random_package(tmp_path / "cache", "simple_cnn", CIFAR10_CLASSES, data) == (package, run)
    assert (package / "manifest.json").stat().st_mtime_ns == written


@pytest.mark.slow
def test_batch_scoring_benchmark_writes_its_report(tmp_path, monkeypatch, image_tree_factory, tar_archive_factory):
    from benchmarks import batch_scoring
    from tests.support.color_package import COLOR_CLASSES, make_color_package

    monkeypatch.setattr(batch_scoring, "CACHE", tmp_path / "cache")
    package = make_color_package(tmp_path / "package")
    tree = image_tree_factory(tmp_path / "data", COLOR_CLASSES, {"test": 4}, size=(32, 32), suffix=".jpg")
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz")
    out = tmp_path / "batch_scoring.md"
    argv = [
        "--resnet", str(package), "--cnn", str(package), "--data", str(archive), "--workers", "1",
        "--seconds", "0.05", "--rounds", "1", "--no-ray", "--out", str(out),
    ]  # fmt: skip
    assert batch_scoring.main(argv) == 0
    report = out.read_text()
    assert "| job | images/s |" in report and "| accuracy from output |" in report
    assert "12" in report.splitlines()[0].split()  # the title counts the images the archive held


def test_raw_engine_prints_a_rate_per_batch_size(tmp_path, capsys, image_tree_factory, tar_archive_factory):
    from benchmarks.raw_engine import main
    from tests.support.color_package import COLOR_CLASSES, make_color_package

    package = make_color_package(tmp_path / "package")
    tree = image_tree_factory(tmp_path / "data", COLOR_CLASSES, {"test": 2}, size=(32, 32), suffix=".jpg")
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz")
    argv = ["--package", str(package), "--data", str(archive), "--batch-sizes", "1,4", "--seconds", "0.02"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["batch    1", "batch    4"]
    assert main([*argv, "--calls", "2"]) == 0  # two calls side by side, as two model instances run
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main([*argv, "--calls", "0"]) == 2
    assert main(["--package", str(tmp_path / "missing"), "--data", str(archive)]) == 2


def test_raw_engine_counts_the_images_of_every_side_by_side_call():
    import threading

    from benchmarks.raw_engine import measure_engine

    class CountingPredictor:
        def __init__(self) -> None:
            self.callers: list[int] = []

        def predict(self, pixels):
            self.callers.append(threading.get_ident())
            return pixels

    predictor = CountingPredictor()
    [result] = measure_engine(predictor, np.zeros((10, 2, 2, 3), np.uint8), (4,), seconds=0.05, calls=2)
    assert result.images == 4 * (len(predictor.callers) - 1)  # all but the warm-up call
    assert len(set(predictor.callers[1:])) == 2  # two threads called it


def test_batch_scoring_extracts_each_archives_test_split_apart(tmp_path, monkeypatch, image_tree_factory,
                                                              tar_archive_factory):  # fmt: skip
    from benchmarks import batch_scoring

    monkeypatch.setattr(batch_scoring, "CACHE", tmp_path / "cache")
    splits = []
    for name, count in (("a", 1), ("b", 2)):
        tree = image_tree_factory(tmp_path / name, ("cat", "dog"), {"test": count}, suffix=".jpg")
        splits.append(batch_scoring.test_split(tar_archive_factory(tree, tmp_path / f"{name}.tar.gz")))
    assert [len(list(folder.rglob("*.jpg"))) for folder, _ in splits] == [2, 4]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("client", ["python", "wrk"])
def test_loadgen_clients_measure_a_running_server(tmp_path, client):
    if client == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    from benchmarks.loadgen import closed_loop, write_image_files, wrk_closed_loop
    from benchmarks.servers import NOOP_SERVICE, BentoServer
    from inference.imaging import encode_png

    images = [encode_png(np.full((32, 32, 3), value, dtype=np.uint8)) for value in (0, 128, 255)]
    with BentoServer(NOOP_SERVICE, {"VISIONSERVE_WORKERS": "1"}, tmp_path, "noop-smoke") as server:
        url = f"{server.url}/classify"
        if client == "wrk":
            listing = write_image_files(images, tmp_path / "images")
            phase = wrk_closed_loop("noop-smoke", url, listing, concurrency=2, duration=1, warmup=0)
        else:
            phase = asyncio.run(closed_loop("noop-smoke", url, images, concurrency=2, duration=1, warmup=0))
    assert phase.ok > 0 and phase.ok == phase.requests
    assert phase.requests_per_second > 0 and phase.p50_ms <= phase.p99_ms


def test_onnx_profile_reports_every_node_of_each_batch(tmp_path, capsys):
    from benchmarks.onnx_profile import main
    from tests.support.color_package import make_color_package

    package = make_color_package(tmp_path / "package")
    out = tmp_path / "profile.md"
    assert main(["--package", str(package), "--batch-sizes", "1,3", "--runs", "5", "--out", str(out)]) == 0
    report = out.read_text()
    assert "| onnx | 1 |" in report and "| onnx | 3 |" in report
    sections = report.split("\n## ")[1:]  # one per backend and batch size, the batch size last in its heading
    assert [section.split("\n")[0].split()[-1] for section in sections] == ["1", "3"]
    for section in sections:  # the colour model's nodes, each with its own time
        node_rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
        assert len(node_rows) >= 2
    assert main(["--package", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_service_cpu_thread_accounting_separates_the_main_thread_from_the_others():
    import os
    import threading
    import time

    from benchmarks.service_cpu import thread_cpu

    def burn(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    before = thread_cpu(os.getpid())
    worker = threading.Thread(target=burn, args=(0.3,))
    worker.start()
    worker.join()
    middle = thread_cpu(os.getpid())
    burn(0.3)
    after = thread_cpu(os.getpid())
    assert middle["other"] - before["other"] >= 0.25 and middle["loop"] - before["loop"] < 0.1
    assert after["loop"] - middle["loop"] >= 0.25


def test_service_cpu_report_derives_each_ceiling_from_the_measured_cores():
    from benchmarks.service_cpu import markdown

    def phase(rate: float, loop: float, other: float, wrk: float) -> dict:
        return {
            "requests_per_second": rate,
            "loop_cores": loop,
            "other_cores": other,
            "wrk_cores": wrk,
            "loop_ms_per_request": 1000 * loop / rate,
            "server_ms_per_request": 1000 * (loop + other) / rate,
        }

    row = {
        "engine_images_per_second": 200.0,
        "engine_batch": 128,
        "engine_calls": 2,
        "noop": phase(1000, 1.0, 0.0, 0.1),  # 1 ms of event loop per request
        "noop-tuned": phase(1600, 1.0, 0.0, 0.1),  # 0.625 ms
        "small-cnn": phase(800, 1.0, 0.1, 0.1),
        "resnet18": phase(150, 0.3, 1.5, 0.1),
        "resnet18-2i": phase(170, 0.2, 1.7, 0.1),  # two model instances
    }
    results = {
        "command": "python -m benchmarks.service_cpu",
        "date": "2026-11-27",
        "machine": {"cpu_model": "test CPU", "python": "3.11", "load_average_at_start": [0, 0, 0]},
        "cores": 2,
        "settings": {"concurrency": 32, "duration_s": 8, "rounds": 1},
        "decode_ms": 0.25,
        "rounds": [row],
    }
    report = markdown(results)
    assert "| noop | 1000 | 1.00 | 0.00 | 0.10 | 0.90 | 1.000 | 1.000 |" in report
    assert "0.625 / (0.625 + 0.250)" in report
    # Every percentage, in order: small CNN vs the no-op (median, rounds) and vs noop-tuned, its decode ceiling
    # 0.625 / (0.625 + 0.250) and target; then resnet18 and resnet18-2i each vs the raw engine (median, rounds) and
    # their ceiling (cores - event loop - wrk) / cores (median, rounds, target): (2 - 0.3 - 0.1) / 2 = 80.0%.
    assert re.findall(r"(\d+(?:\.\d+)?)%", report) == [
        "80.0", "80", "50.0", "50", "71.4", "90",
        "75.0", "75", "80.0", "80", "80",
        "85.0", "85", "85.0", "85", "80",
    ]  # fmt: skip


def test_decode_benchmark_compares_both_paths_on_every_image(tmp_path, image_tree_factory, tar_archive_factory):
    from benchmarks.decode import main

    tree = image_tree_factory(tmp_path / "data", ("cat", "dog"), {"test": 3}, size=(32, 32), suffix=".jpg")
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz")
    out = tmp_path / "decode.md"
    assert main(["--data", str(archive), "--timed", "4", "--rounds", "1", "--out", str(out)]) == 0
    report = out.read_text()
    # Identical arrays: 6 of 6 images; 6 of them took simplejpeg's path.
    [same_pixels] = [line for line in report.splitlines() if re.search(r"\*\*\d+ of \d+\*\*", line)]
    assert re.findall(r"\d+", same_pixels) == ["6", "6", "6"]
    assert "| as stored (32x32) | 4 |" in report and "| re-encoded at 256x256 | 1 |" in report
    assert main(["--data", str(tmp_path / "missing.tar.gz"), "--out", str(out)]) == 1


def test_service_cpu_pure_python_stack_hides_httptools_and_uvloop():
    import os
    import subprocess
    import sys

    from benchmarks.service_cpu import pure_python_http_stack

    # uvicorn's choice: httptools and uvloop when they import, else h11 and asyncio's loop.
    script = (
        "from uvicorn.loops.auto import auto_loop_factory; from uvicorn.protocols.http.auto import AutoHTTPProtocol;"
        "print(AutoHTTPProtocol.__name__, auto_loop_factory()().__class__.__module__)"
    )
    hidden = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **pure_python_http_stack()}, capture_output=True, text=True
    )
    assert hidden.stdout.split() == ["H11Protocol", "asyncio.unix_events"], hidden.stderr
    installed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert installed.stdout.split() == ["HttpToolsProtocol", "uvloop"], installed.stderr


@pytest.mark.slow
def test_wrk_sends_the_headers_it_is_given_and_the_auth_benchmark_reports_its_ratio(tmp_path):
    """The auth benchmark's client: with the key every request is answered 200, without it none is."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    from benchmarks.auth_cost import markdown, write_keys
    from benchmarks.loadgen import write_image_files, wrk_closed_loop
    from inference.imaging import encode_png
    from tests.support.color_package import make_color_package
    from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server

    keys, key = write_keys(tmp_path, 3)
    assert len(keys.read_text().splitlines()) == 3
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_API_KEYS_FILE": str(keys)}
    running = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    listing = write_image_files([encode_png(np.zeros((32, 32, 3), np.uint8))], tmp_path / "images")
    try:
        url = f"{running.url}/classify"
        with_key = wrk_closed_loop("on", url, listing, 2, 1, 0, {"Authorization": f"Bearer {key}"})
        without = wrk_closed_loop("off", url, listing, 2, 1, 0)
    finally:
        stop_server(running)
    assert with_key.ok > 0 and with_key.ok == with_key.requests
    assert without.ok == 0 and without.requests > 0
    figures = {"requests_per_second": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "statuses": {"2xx": 10}}
    results = {
        "command": "python -m benchmarks.auth_cost",
        "date": "2026-12-05T00:00:00+00:00",
        "machine": {"nproc": 2, "cpu_model": "cpu", "load_average_at_start": [0, 0, 0]},
        "package": {"name": "color", "arch": "color"},
        "settings": {"keys_in_file": 3, "seconds": 1, "concurrency": 2, "client": "wrk"},
        "rounds": [{"keys off": figures, "keys on": {**figures, "requests_per_second": 99.0}}],
        "ratios": [0.99],
        "ratio_median": 0.99,
        "target_ratio": 0.97,
    }
    assert "**0.990** (target at least 0.97: met)" in markdown(results)


def test_the_fastapi_peer_answers_as_the_service_does(tmp_path, monkeypatch):
    """The comparison's peers share benchmarks/peers/model.py: the plain FastAPI one, driven in-process."""
    import importlib

    from fastapi.testclient import TestClient

    from inference.imaging import encode_png
    from tests.support.color_package import color_pixels, make_color_package

    monkeypatch.setenv("PEER_PACKAGE", str(make_color_package(tmp_path / "color")))
    monkeypatch.setenv("PEER_THREADS", "1")
    module = importlib.reload(importlib.import_module("benchmarks.peers.fastapi_app"))
    with TestClient(module.app) as client:
        image = encode_png(color_pixels("green")[0])
        answer = client.post("/classify", files={"image": ("green.png", image, "image/png")}).json()
    assert answer["predictions"][0]["label"] == "green" and len(answer["predictions"]) == 3


def test_rounds_table_shows_each_servers_best_concurrency_per_round():
    from benchmarks.loadgen import best_rate_of, rounds_table

    def figures(best: int, rate: float) -> dict:
        return {"best_concurrency": best, "by_concurrency": {str(best): {"requests_per_second": rate}}}

    rounds = [{"a": figures(32, 10.0), "b": figures(128, 20.5)}, {"a": figures(8, 11.0), "b": figures(32, 19.0)}]
    assert best_rate_of(rounds[0]["b"]) == 20.5
    assert rounds_table(rounds, ["a", "b"]) == [
        "| round | a req/s (best c) | b req/s (best c) |",
        "|---|---|---|",
        "| 1 | 10.0 (32) | 20.5 (128) |",
        "| 2 | 11.0 (8) | 19.0 (32) |",
    ]


def open_phase(p50: float | None, p99: float | None, ok: int, other: int = 0) -> dict:
    statuses = {"200": ok, **({"unanswered": other} if other else {})}
    return {
        "target_rate": 100.0,
        "p50_ms": p50,
        "p99_ms": p99,
        "statuses": statuses,
        "client_cpu_us_per_request": 70.0,
        "client_late_p99_ms": 1.5,
    }


def test_the_open_loop_verdict_wants_the_lowest_p99_and_every_request_answered():
    from benchmarks.peer_comparison import open_loop_lines, open_loop_summary

    rounds = [
        {
            "service": {"0.5": open_phase(1.0, 5.0, 100), "0.8": open_phase(2.0, 20.0, 100)},
            "fast": {"0.5": open_phase(1.0, 6.0, 100), "0.8": open_phase(2.0, 10.0, 100)},
            # Overloaded: most requests unanswered, and a round where nothing was answered at all.
            "slow": {"0.5": open_phase(900.0, 4.0, 10, 90), "0.8": open_phase(None, None, 0, 100)},
        },
        {
            "service": {"0.5": open_phase(1.0, 7.0, 100), "0.8": open_phase(2.0, 30.0, 100)},
            "fast": {"0.5": open_phase(1.0, 8.0, 100), "0.8": open_phase(2.0, 12.0, 100)},
            "slow": {"0.5": open_phase(950.0, 5.0, 10, 90), "0.8": open_phase(3000.0, 5000.0, 5, 95)},
        },
    ]
    summary = open_loop_summary(rounds)
    assert summary["medians"]["0.5"]["service"] == {"p50_ms": 1.0, "p99_ms": 6.0, "ok_share": 1.0}
    # A round with nothing answered leaves the median to the rounds that answered.
    assert summary["medians"]["0.8"]["slow"] == {"p50_ms": 3000.0, "p99_ms": 5000.0, "ok_share": 0.025}
    # At 50% the slow peer's p99 is lower, but it answered a tenth: the service is still the best there.
    assert summary["service_best"] == {"0.5": True, "0.8": False}
    lines = open_loop_lines(
        {"saturation": 200.0, "loads": [0.5, 0.8], "rounds": rounds, **summary}, {"open_seconds": 10}
    )
    assert "| 50% (100/s) | 1.0 / 6.0 (100%) | 1.0 / 7.0 (100%) | 925.0 / 4.5 (10%) | yes |" in lines
    assert "| 80% (100/s) | 2.0 / 25.0 (100%) | 2.0 / 11.0 (100%) | 3000.0 / 5000.0 (2%) | **no** |" in lines


def test_peer_comparison_sets_the_service_against_the_raw_engine_round_by_round(tmp_path):
    from benchmarks.peer_comparison import engine_ratios, measure_engine_reference
    from tests.support.color_package import color_pixels, make_color_package

    def service(best: int, rate: float, lone_p50_ms: float) -> dict:
        by_concurrency = {"1": {"requests_per_second": 1.0, "p50_ms": lone_p50_ms}}
        by_concurrency[str(best)] = {"requests_per_second": rate, "p50_ms": 50.0}
        return {"service": {"best_concurrency": best, "by_concurrency": by_concurrency}}

    rounds = [service(64, 180.0, 7.0), service(32, 150.0, 9.0), service(64, 190.0, 6.6)]
    engines = [{"images_per_second": 200.0, "lone_call_ms": 6.0}] * 3
    ratios = engine_ratios(rounds, engines, lowest=1)
    assert ratios["service_share_of_engine_rounds"] == [0.9, 0.75, 0.95]
    assert ratios["service_share_of_engine"] == 0.9
    assert ratios["lone_request_over_lone_call_rounds"] == [1.167, 1.5, 1.1]
    assert ratios["lone_request_over_lone_call"] == 1.167
    # Without one connection there is no lone request to set against the lone call.
    assert set(engine_ratios(rounds, engines, lowest=64)) == {
        "service_share_of_engine",
        "service_share_of_engine_rounds",
    }

    package = make_color_package(tmp_path / "color")
    engine = measure_engine_reference(package, np.concatenate([color_pixels("red")] * 8), workers=2, seconds=0.05)
    assert engine["calls"] == 2 and engine["best_batch_size"] in (8, 32, 64)
    assert engine["images_per_second"] > 0 and engine["lone_call_ms"] > 0


def test_request_cost_reports_what_each_bentoml_layer_costs_round_by_round():
    from benchmarks.request_cost import medians, multipart_body
    from service.multipart import FilePart, simple_form

    content_type = "multipart/form-data; boundary=request-cost-boundary"
    assert simple_form(multipart_body(b"jpeg"), content_type, 1, 8) == [("image", FilePart("image.jpg", b"jpeg"))]

    def figures(loop_us: float) -> dict:
        return {"requests_per_second": 1e6 / loop_us, "event_loop_us_per_request": loop_us,
                "process_us_per_request": 2 * loop_us}  # fmt: skip

    rounds = [
        {"bentoml": figures(250), "bentoml-without-TimeoutMiddleware": figures(240), "routes": figures(150)},
        {"bentoml": figures(230), "bentoml-without-TimeoutMiddleware": figures(200), "routes": figures(160)},
        {"bentoml": figures(260), "bentoml-without-TimeoutMiddleware": figures(250), "routes": figures(140)},
    ]
    result = medians(rounds)
    assert result["bentoml"]["event_loop_us_per_request"] == 250
    assert result["bentoml-without-TimeoutMiddleware"]["event_loop_us_saved"] == 10  # of 10, 30, 10
    assert "event_loop_us_saved" not in result["routes"]


def test_request_cost_measures_each_variant_in_its_own_process(tmp_path, image_tree_factory, tar_archive_factory):
    from benchmarks.request_cost import main
    from tests.support.color_package import COLOR_CLASSES, make_color_package

    tree = image_tree_factory(tmp_path / "data", COLOR_CLASSES, {"test": 2}, size=(32, 32), suffix=".jpg")
    archive = tar_archive_factory(tree, tmp_path / "data.tar.gz")
    out = tmp_path / "request_cost.md"
    argv = ["--package", str(make_color_package(tmp_path / "color")), "--data", str(archive), "--requests", "64"]
    assert (
        main([*argv, "--concurrency", "4", "--rounds", "1", "--variants", "bentoml", "routes", "--out", str(out)]) == 0
    )
    results = json.loads(out.with_suffix(".json").read_text())
    assert list(results["medians"]) == ["bentoml", "routes"]
    assert all(r["requests"] == 64 and r["event_loop_us_per_request"] > 0 for r in results["rounds"][0].values())
    assert "| routes |" in out.read_text()


def test_a_peers_leftover_programs_are_ended_and_nothing_else(tmp_path):
    from benchmarks.peer_comparison import end_leftovers

    site = tmp_path / "site"
    (site / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("sleep"), site / "bin" / "sleep")
    leftover = subprocess.Popen([str(site / "bin" / "sleep"), "60"], start_new_session=True)
    bystander = subprocess.Popen([shutil.which("sleep"), "60"])
    try:
        end_leftovers(site)
        assert leftover.wait(timeout=10) != 0
        assert bystander.poll() is None
    finally:
        for process in (leftover, bystander):
            process.kill()
            process.wait()


def test_a_peer_is_waited_for_until_it_answers_and_not_once_it_has_exited(tmp_path):
    import httpx

    from benchmarks.servers import wait_until_answering

    log = tmp_path / "peer.log"
    running = subprocess.Popen([shutil.which("sleep"), "30"])
    answers = iter([httpx.ConnectError("refused"), False, True])

    def probe() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    try:
        wait_until_answering(running, probe, timeout_s=10, name="peer", log_path=log)  # refused, not yet, then up
        with pytest.raises(RuntimeError, match="did not answer within 1 s"):
            wait_until_answering(running, lambda: False, timeout_s=1, name="peer", log_path=log)
    finally:
        running.kill()
        running.wait()
    exited = subprocess.Popen([shutil.which("true")])
    exited.wait()
    with pytest.raises(RuntimeError, match="peer exited at start"):
        wait_until_answering(exited, lambda: True, timeout_s=10, name="peer", log_path=log)


@pytest.mark.slow  # seconds of attack against two servers
def test_the_request_heads_benchmark_sees_what_a_server_closes_and_what_it_holds(monkeypatch):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from benchmarks import request_heads
    from benchmarks.request_heads import attack
    from service.http_protocol import ConnectionLimits
    from tests.support.servers import serving

    limited = type("FastLimits", (ConnectionLimits, HttpToolsProtocol), {"head_timeout_s": 0.5})
    images = [b"not a real image, answered all the same"]
    monkeypatch.setattr(request_heads, "ENDLESS_CAP_BYTES", 2**25)  # the server without limits runs in this process
    with serving(limited) as port:
        held_back = asyncio.run(attack(f"http://127.0.0.1:{port}", images, connections=4, seconds=2.5))
    with serving(HttpToolsProtocol) as port:
        held = asyncio.run(attack(f"http://127.0.0.1:{port}", images, connections=4, seconds=2.5))
    assert held_back["silent_closed_by_server"] == held_back["slowloris_closed_by_server"] == 2
    assert 0.5 <= held_back["silent_closed_after_s_median"] < 2.5
    assert held_back["endless_head_ended_by"] in ("ConnectionResetError", "BrokenPipeError")
    assert held["silent_closed_by_server"] == held["slowloris_closed_by_server"] == 0
    assert held["endless_head_ended_by"] == "still open at the end"
    assert held["endless_head_bytes_accepted"] >= 2**25 > held_back["endless_head_bytes_accepted"]
    assert held_back["normal_ok"] == held_back["normal_requests"] > 0
