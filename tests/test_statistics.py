"""Tests of service.statistics: Triton's statistics counters, summed over the workers that share a folder, and
through a real server with two workers."""

from __future__ import annotations

import httpx
import pytest

from inference.imaging import encode_png
from service.statistics import LAST_INFERENCE_MS, SUCCESS, InferenceStatistics, requests_by_worker, server_folder
from tests.support.color_package import color_pixels, make_color_package
from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server, wait_until, workers


def record_one_request(statistics: InferenceStatistics, batch_images: int = 1) -> None:
    statistics.record_queue(5)
    statistics.record_execution(requests=1, images=batch_images, input_ns=1, infer_ns=10, output_ns=2)
    statistics.record_success(20)


def test_in_memory_counters_in_tritons_shape():
    statistics = InferenceStatistics(max_batch_size=4)
    record_one_request(statistics, batch_images=3)
    statistics.record_failure(7)
    stats = statistics.model_stats("color", "1")
    assert (stats["name"], stats["version"], stats["inference_count"], stats["execution_count"]) == ("color", "1", 3, 1)
    inference = stats["inference_stats"]
    assert inference["success"] == {"count": 1, "ns": 20} and inference["fail"] == {"count": 1, "ns": 7}
    assert inference["queue"] == {"count": 1, "ns": 5}
    assert [inference[key] for key in ("compute_input", "compute_infer", "compute_output")] == [
        {"count": 1, "ns": 1},
        {"count": 1, "ns": 10},
        {"count": 1, "ns": 2},
    ]
    assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
    assert stats["batch_stats"] == [
        {
            "batch_size": 3,
            "compute_input": {"count": 1, "ns": 1},
            "compute_infer": {"count": 1, "ns": 10},
            "compute_output": {"count": 1, "ns": 2},
        }
    ]
    assert stats["last_inference"] > 0


def test_a_batch_counts_each_of_its_requests_with_the_whole_batch_time():
    statistics = InferenceStatistics(max_batch_size=8)
    statistics.record_execution(requests=3, images=8, input_ns=4, infer_ns=40, output_ns=6)
    inference = statistics.model_stats("m", "1")["inference_stats"]
    assert inference["compute_infer"] == {"count": 3, "ns": 120}
    assert statistics.model_stats("m", "1")["batch_stats"][0]["compute_infer"] == {"count": 1, "ns": 40}


def test_every_worker_of_a_version_counts_in_every_answer(tmp_path):
    # Two workers' batchers of one version (here in one process: each has a file of its own), one of another.
    first = InferenceStatistics(4, "color", "1", tmp_path)
    second = InferenceStatistics(8, "color", "1", tmp_path)  # a wider file: summed all the same
    other = InferenceStatistics(4, "color", "2", tmp_path)
    record_one_request(first)
    for _ in range(2):
        record_one_request(second, batch_images=8)
    record_one_request(other)
    for statistics in (first, second):
        stats = statistics.model_stats("color", "1")
        assert stats["inference_stats"]["success"] == {"count": 3, "ns": 60}
        assert stats["inference_count"] == 1 + 16 and stats["execution_count"] == 3
        assert {entry["batch_size"]: entry["compute_infer"]["count"] for entry in stats["batch_stats"]} == {1: 1, 8: 2}
    assert other.model_stats("color", "2")["inference_count"] == 1


def test_the_latest_inference_is_the_latest_of_any_worker(tmp_path):
    first, second = InferenceStatistics(1, "m", "1", tmp_path), InferenceStatistics(1, "m", "1", tmp_path)
    record_one_request(first)
    record_one_request(second)
    assert first.totals()[LAST_INFERENCE_MS] == max(
        first._counters[LAST_INFERENCE_MS], second._counters[LAST_INFERENCE_MS]
    )


def test_a_closed_batcher_leaves_the_sum_and_still_counts_a_late_answer(tmp_path):
    staying, closing = InferenceStatistics(2, "m", "1", tmp_path), InferenceStatistics(2, "m", "1", tmp_path)
    record_one_request(staying)
    record_one_request(closing)
    closing.close()
    assert not closing.path.exists()
    record_one_request(closing)  # a model call that was in flight when its batcher stopped
    assert closing.totals()[SUCCESS] == 2  # its own, in memory
    assert staying.totals()[SUCCESS] == 1
    closing.close()  # twice is harmless


def test_any_model_name_is_one_folder(tmp_path):
    statistics = InferenceStatistics(1, "../a/b", "1", tmp_path)
    assert statistics.path.parent.parent.parent == tmp_path


# --- a real server with two workers ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_two_workers_answer_the_same_statistics_with_both_workers_requests(tmp_path):
    # perf_analyzer reads the statistics before and after a run, through whichever worker answers: each answer
    # must count every worker's requests, or it finds no version that served any.
    server = start_server(
        make_color_package(tmp_path / "color"), tmp_path, {**SERVICE_TEST_SETTINGS, "VISIONSERVE_WORKERS": "2"}
    )
    folder = server_folder(tmp_path / "bentoml")
    try:
        wait_until(lambda: len(workers(server.process.pid)) == 2 and len(requests_by_worker(folder)) == 2, "2 workers")

        def per_worker() -> list[int]:
            return list(requests_by_worker(folder).values())

        png = encode_png(color_pixels("blue")[0])
        sent = 0
        # Each request on a connection of its own, which the kernel gives to either worker; until both served some.
        while sent < 16 or (min(per_worker()) == 0 and sent < 200):
            response = httpx.post(f"{server.url}/classify", content=png, headers={"content-type": "image/png"})
            assert response.status_code == 200
            sent += 1
        assert min(per_worker()) > 0 and sum(per_worker()) == sent
        answers = [httpx.get(f"{server.url}/v2/models/color/stats").json()["model_stats"][0] for _ in range(12)]
        assert {stats["inference_stats"]["success"]["count"] for stats in answers} == {sent}
        assert {stats["inference_count"] for stats in answers} == {sent}
    finally:
        stop_server(server)
