"""Tests of Triton's model-configuration and statistics extensions on the v2 routes (service.oip, service.batcher's
InferenceStatistics): their shapes in this process, then through tritonclient against the real server."""

from __future__ import annotations

import numpy as np
import pytest
from starlette.testclient import TestClient

from inference.imaging import encode_png
from service import app as service_app
from service.classifier import Classifier
from service.errors import ApiError
from service.settings import ServiceSettings
from tests.support.color_package import color_pixels, make_color_package

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    package = make_color_package(tmp_path_factory.mktemp("triton") / "color")
    settings = ServiceSettings(
        model=str(package), device="cpu", max_batch_images=8, max_batch_size=4, max_latency_ms=2.5, model_instances=2
    )
    classifier = Classifier(settings)
    app = service_app.create_app()
    service_app.attach(app, classifier)
    with TestClient(app) as client:
        client.portal.call(classifier.start)
        yield client, classifier
        client.portal.call(classifier.stop)


def test_server_metadata_lists_the_extensions(served):
    client, _ = served
    extensions = client.get("/v2").json()["extensions"]
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(extensions)


@pytest.mark.parametrize("path", ["/v2/models/color/config", "/v2/models/color/versions/1/config"])
def test_the_model_configuration_is_the_package_and_the_batchers_settings(served, path):
    client, _ = served
    assert client.get(path).json() == {
        "name": "color",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,  # VISIONSERVE_MAX_BATCH_IMAGES: the most images one request may carry
        "input": [{"name": "pixels", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [3]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 2500},
        "instance_group": [{"name": "color", "kind": "KIND_CPU", "count": 2}],
    }


def model_stats(client: TestClient, path: str = "/v2/models/color/stats") -> dict:
    response = client.get(path)
    assert response.status_code == 200, response.text
    [entry] = response.json()["model_stats"]
    return entry


def test_statistics_count_requests_images_and_model_calls(served):
    client, classifier = served
    before = model_stats(client)
    png = encode_png(color_pixels("blue")[0])
    files = [("images", (f"{i}.png", png)) for i in range(6)]  # 6 images, model calls of at most 4
    assert client.post("/classify_batch", files=files).status_code == 200
    assert client.post("/classify", content=png, headers={"content-type": "image/png"}).status_code == 200
    with pytest.raises(ApiError):  # a failed request counts too
        client.portal.call(classifier.infer, np.zeros((1, 8, 8, 3), np.uint8))
    after = model_stats(client)
    assert (after["name"], after["version"]) == ("color", "1")
    assert after["inference_count"] - before["inference_count"] == 7
    assert after["execution_count"] - before["execution_count"] >= 3  # 6 = 4 + 2, then 1
    stats, old = after["inference_stats"], before["inference_stats"]
    assert set(stats) == set(DURATIONS)
    assert stats["success"]["count"] - old["success"]["count"] == 2
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    # The request of 6 images is two parts in the queue and the model calls: 3 parts in all.
    assert stats["queue"]["count"] - old["queue"]["count"] == 3
    compute_counts = {stats[name]["count"] for name in ("compute_input", "compute_infer", "compute_output")}
    assert len(compute_counts) == 1  # perf_analyzer refuses statistics whose three differ
    assert stats["compute_infer"]["ns"] > old["compute_infer"]["ns"] and stats["success"]["ns"] > 0
    assert stats["cache_hit"] == stats["cache_miss"] == {"count": 0, "ns": 0}
    sizes = {entry["batch_size"]: entry for entry in after["batch_stats"]}
    assert {1, 2, 4} <= set(sizes)
    assert all(isinstance(value["ns"], int) for value in sizes[4].values() if isinstance(value, dict))
    assert after["last_inference"] > 0
    # Every model's statistics (what perf_analyzer asks for) and one version's are the same entry.
    assert model_stats(client, "/v2/models/stats") == model_stats(client, "/v2/models/color/versions/1/stats")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/models/nope/config", "model_not_found"),
        ("/v2/models/color/versions/2/config", "version_not_found"),
        ("/v2/models/nope/stats", "model_not_found"),
        ("/v2/models/color/versions/2/stats", "version_not_found"),
    ],
)
def test_an_unknown_model_or_version_is_404(served, path, code):
    client, _ = served
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["code"] == code


# --- tritonclient against the real server ------------------------------------------------------------------------


@pytest.mark.e2e
def test_tritonclient_reads_the_configuration_and_the_statistics(color_service):
    http = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http] (the dev extra)")
    client = http.InferenceServerClient(color_service.url.removeprefix("http://"))
    try:
        assert {"model_configuration", "statistics"} <= set(client.get_server_metadata()["extensions"])
        config = client.get_model_config("color")
        assert config["max_batch_size"] == 8  # SERVICE_TEST_SETTINGS' VISIONSERVE_MAX_BATCH_IMAGES
        assert config["input"][0]["dims"] == [32, 32, 3] and config["output"][0]["dims"] == [3]
        assert client.get_model_config("color", model_version="1") == config
        before = client.get_inference_statistics("color")["model_stats"][0]

        pixels = color_pixels("green", batch=3)
        inputs = [http.InferInput("pixels", list(pixels.shape), "UINT8")]
        inputs[0].set_data_from_numpy(pixels, binary_data=True)
        outputs = [http.InferRequestedOutput("probabilities", binary_data=True)]
        result = client.infer("color", inputs, outputs=outputs)
        assert result.as_numpy("probabilities").argmax(axis=1).tolist() == [1, 1, 1]

        after = client.get_inference_statistics("color")["model_stats"][0]
        assert after["inference_count"] - before["inference_count"] == 3
        success = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
        assert success == 1
        assert client.get_inference_statistics()["model_stats"][0]["name"] == "color"  # every model's
    finally:
        client.close()
