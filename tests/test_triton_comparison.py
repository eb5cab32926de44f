"""The Triton comparison's pure parts (pairing rounds, the report, the points) and the perf_analyzer arguments it
relies on; nothing here needs PyTriton, Triton or perf_analyzer installed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from benchmarks.triton_comparison import markdown, point, summarize


def run(round_index: int, server: str, batch: int, concurrency: int, rate: float | None) -> dict:
    entry = {"round": round_index, "server": server, "batch_size": batch, "concurrency": concurrency}
    if rate is None:
        return {**entry, "returncode": 99, "error": "Failed to obtain stable measurement."}
    return {**entry, "returncode": 0, "infer_per_s": rate, "p50_us": 1500.0, "p99_us": 4000.0}


def test_summary_pairs_the_servers_round_by_round_and_leaves_failures_out():
    runs = [
        # b=1 c=32: the median of the paired ratios (1.0, 4/3, 2.5) is 4/3, not the ratio of the medians (2000 / 1200)
        run(1, "service", 1, 32, 1000.0), run(1, "triton", 1, 32, 1000.0),
        run(2, "triton", 1, 32, 1500.0), run(2, "service", 1, 32, 2000.0),
        run(3, "service", 1, 32, 3000.0), run(3, "triton", 1, 32, 1200.0),
        # b=8 c=8: the service failed in round 2, so only rounds 1 and 3 pair up.
        run(1, "service", 8, 8, 6000.0), run(1, "triton", 8, 8, 5000.0),
        run(2, "triton", 8, 8, 100.0), run(2, "service", 8, 8, None),
        run(3, "service", 8, 8, 7000.0), run(3, "triton", 8, 8, 5000.0),
        # b=1 c=1: Triton failed every round.
        run(1, "service", 1, 1, 900.0), run(1, "triton", 1, 1, None),
    ]  # fmt: skip
    by_point = {(p["batch_size"], p["concurrency"]): p for p in summarize(runs)}
    assert list(by_point) == [(1, 1), (1, 32), (8, 8)]

    assert by_point[1, 32]["rounds"] == {"service": [1000.0, 2000.0, 3000.0], "triton": [1000.0, 1500.0, 1200.0]}
    assert by_point[1, 32]["median_infer_per_s"] == {"service": 2000.0, "triton": 1200.0}
    assert by_point[1, 32]["service_over_triton"] == pytest.approx(4 / 3)

    assert by_point[8, 8]["rounds"]["service"] == [6000.0, 7000.0]
    assert by_point[8, 8]["median_infer_per_s"] == {"service": 6500.0, "triton": 5000.0}
    assert by_point[8, 8]["service_over_triton"] == pytest.approx((1.2 + 1.4) / 2)  # round 2's 100 unpaired

    assert by_point[1, 1]["median_infer_per_s"] == {"service": 900.0, "triton": None}
    assert by_point[1, 1]["service_over_triton"] is None


def results(runs: list[dict]) -> dict:
    return {
        "command": "python -m benchmarks.triton_comparison --rounds 2",
        "date": "2026-12-05T00:00:00+00:00",
        "machine": {"nproc": 2, "cpu_model": "test CPU", "load_average_at_start": [0.1, 0.1, 0.1]},
        "perf_analyzer": {"version": "2.60.0", "command": ["perf_analyzer"]},
        "pytriton_environment": {"nvidia-pytriton": "0.7.0", "numpy": "1.26.4"},
        "settings": {
            "points": [[1, 32], [8, 8]],
            "rounds": 2,
            "measurement_interval_ms": 5000,
            "max_trials": 10,
            "stability_percentage": 10,
            "triton_instances": 1,
        },  # fmt: skip
        "models": {
            "lesson-cnn": {
                "package": {"name": "random-cnn-bn", "arch": "cnn_bn", "weights": "random (untrained)"},
                "settings": {
                    "service": {"workers": {"workers": 2, "reason": "one worker per core"}, "intra_op_threads": 1},
                    "triton": {
                        "triton_version": "2.51.0",
                        "max_batch_size": 64,
                        "dynamic_batching": {"max_queue_delay_microseconds": 100, "preferred_batch_size": [64]},
                        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
                        "intra_op_threads_per_instance": 2,
                    },  # fmt: skip
                },
                "runs": runs,
                "summary": summarize(runs),
            }
        },
    }


def test_report_gives_each_points_rounds_medians_and_ratio_and_names_the_failures():
    runs = [
        run(1, "service", 1, 32, 2400.0), run(1, "triton", 1, 32, 1600.0),
        run(2, "triton", 1, 32, 1500.0), run(2, "service", 1, 32, 2000.0),
        run(1, "service", 8, 8, 7500.0), run(1, "triton", 8, 8, None),
        run(2, "triton", 8, 8, 7000.0), run(2, "service", 8, 8, 7700.0),
    ]  # fmt: skip
    report = markdown(results(runs))
    # b=1 c=32: ratios 1.5 and 1.333..., median 1.42 (to two places)
    assert "| 1 | 32 | 2,400.0 / 2,000.0 | 1,600.0 / 1,500.0 | 2,200.0 | 1,550.0 | **1.42** |" in report
    # b=8 c=8: Triton measured round 2 only, so the one paired round gives the ratio
    assert "| 8 | 8 | 7,500.0 / 7,700.0 | 7,000.0 | 7,600.0 | 7,000.0 | **1.10** |" in report
    assert "- round 1 triton b=8 c=8: Failed to obtain stable measurement." in report
    assert "2 worker(s) (one worker per core)" in report
    assert "Triton 2.51.0: max_batch_size 64, dynamic batching 100 us max queue delay" in report
    assert "p50 / p99 ms, round 1: b=1 c=32: service 1.50 / 4.00, triton 1.50 / 4.00; b=8 c=8: service 1.50" in report


def test_points_are_batch_colon_concurrency():
    assert point("8:32") == (8, 32)
    for bad in ("8", "8x32", "0:8", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            point(bad)


def test_measure_passes_the_batch_and_version_to_perf_analyzer_only_when_asked(tmp_path):
    """A stand-in perf_analyzer records its arguments and writes the CSV row perf_analyzer would."""
    from benchmarks.perf_analyzer import CSV_FIELDS, measure

    log = tmp_path / "arguments.json"
    fake = tmp_path / "fake_perf_analyzer.py"
    fake.write_text(
        "import csv, json, sys\n"
        f"columns = {list(CSV_FIELDS)!r}\n"
        "arguments = sys.argv[1:]\n"
        f"open({str(log)!r}, 'a').write(json.dumps(arguments) + '\\n')\n"
        "with open(arguments[arguments.index('-f') + 1], 'w', newline='') as f:\n"
        "    writer = csv.writer(f); writer.writerow(columns); writer.writerow(range(100, 100 + len(columns)))\n"
    )
    command = [sys.executable, str(fake)]
    plain = measure(command, "m", "127.0.0.1:1", "http", 4, 1000, 3, 50)
    batched = measure(command, "m", "127.0.0.1:1", "http", 32, 1000, 3, 50, batch_size=8, model_version="1")
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert "-b" not in first and "-x" not in first
    assert second[second.index("-b") + 1] == "8" and second[second.index("-x") + 1] == "1"
    assert second[second.index("--concurrency-range") + 1] == "32:32"
    assert plain["infer_per_s"] == 100.0 and batched["concurrency"] == 32 and "error" not in batched


def test_the_service_chooses_its_workers_unless_told(tmp_path):
    from benchmarks.perf_analyzer import serve

    chosen, _ = serve(Path(tmp_path), "chosen", None)
    told, _ = serve(Path(tmp_path), "told", 1)
    assert "VISIONSERVE_WORKERS" not in chosen.env
    assert told.env["VISIONSERVE_WORKERS"] == "1"
