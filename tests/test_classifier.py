"""Tests of the serving Classifier and its settings, without a server: loading, readiness, decode, infer, top-k, metadata."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.imaging import encode_png
from inference.package import PackageError, sha256_file
from inference.runtime import CPU_PROVIDER, DeviceUnavailableError
from service.classifier import Classifier
from service.errors import ApiError
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import COLOR_CLASSES, color_pixels, cuda_session_works, make_color_package

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def color_package(tmp_path_factory) -> Path:
    return make_color_package(tmp_path_factory.mktemp("pkg") / "color")


@pytest.fixture(scope="module")
def classifier(color_package) -> Classifier:
    return Classifier(ServiceSettings(model=str(color_package), device="cpu", max_batch_size=4, max_batch_images=8))


# --- settings -----------------------------------------------------------------------------------------------------


def test_settings_read_the_environment_with_types():
    settings = ServiceSettings.from_env(
        {
            "VISIONSERVE_MODEL": "/pkg",
            "VISIONSERVE_MAX_BATCH_SIZE": "32",
            "VISIONSERVE_MAX_LATENCY_MS": "2.5",
        }
    )
    assert (settings.model, settings.max_batch_size, settings.max_latency_ms) == ("/pkg", 32, 2.5)
    assert settings.device == "auto"  # unset variables keep their defaults


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("True", True), ("yes", True), ("0", False), ("off", False)]
)
def test_the_tf32_switch_reads_words_and_digits(value, expected):
    assert ServiceSettings.from_env({"VISIONSERVE_TF32": value}).tf32 is expected
    assert ServiceSettings().tf32 is False


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("VISIONSERVE_DEVICE", "tpu", "valid: auto, cuda, cpu"),
        ("VISIONSERVE_BACKEND", "tensorrt", "valid: onnx"),
        ("VISIONSERVE_MAX_QUEUE", "lots", "not a valid int"),
        ("VISIONSERVE_MAX_BATCH_SIZE", "0", "must be >= 1"),
        ("VISIONSERVE_REQUEST_TIMEOUT_S", "-1", "must be > 0"),
        ("VISIONSERVE_MAX_BATCH_IMAGES", "1000", "must not exceed"),
        ("VISIONSERVE_WORKERS", "-1", "must be >= 0"),
        ("VISIONSERVE_MODEL_INSTANCES", "0", "must be >= 1"),
        ("VISIONSERVE_TF32", "maybe", "not a valid bool"),
    ],
)
def test_settings_refuse_bad_values_naming_the_variable(variable, value, message):
    with pytest.raises(SettingsError, match=message) as error:
        ServiceSettings.from_env({variable: value})
    assert variable.removeprefix("VISIONSERVE_") in str(error.value)


def test_workers_share_the_cores_unless_threads_are_set(monkeypatch):
    monkeypatch.setattr("service.settings.cpu_threads", lambda: 8)
    assert ServiceSettings(workers=1).threads_per_worker == 8
    assert ServiceSettings(workers=3).threads_per_worker == 2
    assert ServiceSettings(workers=16).threads_per_worker == 1
    assert ServiceSettings(workers=2, threads=3).threads_per_worker == 3


def test_model_instances_share_the_worker_threads(monkeypatch):
    monkeypatch.setattr("service.settings.cpu_threads", lambda: 8)
    assert ServiceSettings(model_instances=2).threads_per_instance == 4
    assert ServiceSettings(workers=2, model_instances=2).threads_per_instance == 2
    assert ServiceSettings(model_instances=16).threads_per_instance == 1


# --- loading --------------------------------------------------------------------------------------------------------


def test_a_tampered_package_is_refused(tmp_path):
    package = make_color_package(tmp_path / "color")
    with open(package / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match="checksum"):
        Classifier(ServiceSettings(model=str(package)))


def test_a_missing_folder_or_unknown_tag_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Classifier(ServiceSettings(model=str(tmp_path / "nowhere")))


@pytest.mark.slow  # ONNX Runtime's CUDA probe takes seconds
def test_device_cuda_fails_loudly_without_a_gpu(color_package):
    if cuda_session_works():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceUnavailableError, match="device=cuda"):
        Classifier(ServiceSettings(model=str(color_package), device="cuda"))


def test_auto_falls_back_to_the_cpu_and_says_why(color_package):
    classifier = Classifier(ServiceSettings(model=str(color_package), device="auto"))
    metadata = classifier.metadata()
    if metadata["device"] == "cuda":
        pytest.skip("a GPU is present")
    assert metadata["execution_provider"] == CPU_PROVIDER
    assert metadata["requested_device"] == "auto"
    assert "CUDAExecutionProvider" in metadata["fallback_reason"]


@pytest.mark.slow
def test_a_bentoml_store_tag_resolves_to_the_package(tmp_path, color_package):
    """A package registered in the model store (as export does) loads by tag; separate process for BENTOML_HOME."""
    script = textwrap.dedent(
        f"""
        import shutil, bentoml
        from service.classifier import resolve_package
        with bentoml.models.create("color-test") as model:
            shutil.copytree({str(color_package)!r}, model.path, dirs_exist_ok=True)
        package = resolve_package("color-test:latest")
        print(package.name, package.spec.class_names)
        """
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "color ('red', 'green', 'blue')" in done.stdout


@pytest.mark.slow
def test_the_torchscript_backend_serves_the_same_answers(tmp_path):
    torch = pytest.importorskip("torch")

    class ColorModel(torch.nn.Module):
        def forward(self, pixels):  # (N, H, W, 3) uint8 -> (probabilities, logits), as export writes them
            logits = pixels.float().div(255).mean(dim=(1, 2)) * 8
            return torch.softmax(logits, dim=1), logits

    package = make_color_package(tmp_path / "color")
    torch.jit.script(ColorModel()).save(str(package / "model.ts"))
    manifest = json.loads((package / "manifest.json").read_text())
    manifest["files"]["model.ts"] = {
        "sha256": sha256_file(package / "model.ts"),
        "backend": "torchscript",
    }
    (package / "manifest.json").write_text(json.dumps(manifest))

    async def scenario():
        classifier = Classifier(ServiceSettings(model=str(package), backend="torchscript", device="cpu"))
        await classifier.start()
        pixels = np.concatenate([color_pixels(label) for label in ("green", "red", "blue")])
        probabilities = await classifier.infer(pixels)
        await classifier.stop()
        return classifier.metadata(), probabilities

    metadata, probabilities = asyncio.run(scenario())
    assert (metadata["backend"], metadata["execution_provider"]) == ("torchscript", "torch")
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(1)] == ["green", "red", "blue"]


# --- readiness, infer -----------------------------------------------------------------------------------------------


def test_ready_only_after_start_and_warm_up(color_package):
    async def scenario():
        classifier = Classifier(ServiceSettings(model=str(color_package), device="cpu"))
        before = classifier.ready
        with pytest.raises(ApiError) as not_ready:
            await classifier.infer(color_pixels("red"))
        await classifier.start()
        after = classifier.ready
        await classifier.stop()
        return before, not_ready.value, after, classifier.ready

    before, not_ready, after, stopped = asyncio.run(scenario())
    assert (before, after, stopped) == (False, True, False)
    assert not_ready.status == 503 and not_ready.headers["Retry-After"]


@pytest.mark.parametrize(("device", "expected"), [("cpu", [1, 8]), ("cuda", list(range(1, 9)))])
def test_warm_up_covers_every_batch_size_on_a_gpu(color_package, monkeypatch, device, expected):
    classifier = Classifier(ServiceSettings(model=str(color_package), device="cpu", max_batch_size=8))
    # As if the session had got the GPU: only the device in use decides which sizes are warmed up.
    monkeypatch.setattr(classifier, "info", dataclasses.replace(classifier.info, device=device))
    warmed: list[int] = []
    monkeypatch.setattr(classifier.predictor, "warm_up", warmed.append)

    async def scenario():
        await classifier.start()
        await classifier.stop()

    asyncio.run(scenario())
    assert warmed == expected


def test_start_up_objects_are_frozen_out_of_the_garbage_collector(color_package):
    gc.unfreeze()
    try:
        classifier = Classifier(ServiceSettings(model=str(color_package), device="cpu"))

        async def scenario():
            await classifier.start()
            await classifier.stop()

        asyncio.run(scenario())
        # Frozen objects sit in the permanent generation, which collections (and gc.get_objects) never visit.
        assert gc.get_freeze_count() > 0
        assert not any(tracked is classifier for tracked in gc.get_objects())
    finally:
        gc.unfreeze()


def test_infer_returns_each_images_own_probabilities(classifier):
    async def scenario():
        await classifier.start()
        pixels = np.concatenate([color_pixels(label) for label in ("blue", "red", "green", "blue", "red")])
        # 5 images > max_batch_size 4: split and reassembled.
        probabilities = await classifier.infer(pixels)
        await classifier.stop()
        return probabilities

    probabilities = asyncio.run(scenario())
    assert probabilities.shape == (5, 3) and probabilities.dtype == np.float32
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(1)] == [
        "blue",
        "red",
        "green",
        "blue",
        "red",
    ]


@pytest.mark.parametrize(
    ("pixels", "code"),
    [
        (np.zeros((1, 32, 32, 3), np.float32), "invalid_input"),
        (np.zeros((1, 16, 32, 3), np.uint8), "invalid_input"),
        (np.zeros((0, 32, 32, 3), np.uint8), "invalid_input"),
        (np.zeros((9, 32, 32, 3), np.uint8), "too_many_images"),
    ],
)
def test_infer_refuses_wrong_shapes_dtypes_and_counts(classifier, pixels, code):
    with pytest.raises(ApiError) as refused:
        asyncio.run(classifier.infer(pixels))
    assert (refused.value.status, refused.value.code) == (400, code)


# --- decode ------------------------------------------------------------------------------------------------------


def _encoded(format_: str, size=(40, 20), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (0, 0, 255) if mode == "RGB" else 0).save(buffer, format=format_)
    return buffer.getvalue()


def decode_one(classifier: Classifier, data: bytes) -> np.ndarray:
    [outcome] = asyncio.run(classifier.decode_many([data]))
    if isinstance(outcome, ApiError):
        raise outcome
    return outcome


@pytest.mark.parametrize("size", [(40, 20), (400, 300)])  # decoded on the event loop, and in the pool
def test_decode_resizes_to_the_model_input(classifier, size):
    pixels = decode_one(classifier, _encoded("JPEG", size=size))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "empty"),
        (b"certainly not an image", 415, "unsupported_format"),
        (_encoded("GIF", mode="L"), 415, "unsupported_format"),
        (_encoded("PNG")[:60], 400, "corrupt"),
    ],
)
def test_decode_errors_map_to_http_statuses(classifier, data, status, code):
    with pytest.raises(ApiError) as refused:
        decode_one(classifier, data)
    assert (refused.value.status, refused.value.code) == (status, code)


def test_an_image_over_the_pixel_limit_is_413_before_decoding(color_package):
    small_limit = Classifier(ServiceSettings(model=str(color_package), device="cpu", max_image_pixels=100))
    with pytest.raises(ApiError) as refused:
        decode_one(small_limit, _encoded("PNG", size=(11, 10)))
    assert (refused.value.status, refused.value.code) == (413, "image_too_large")


@pytest.mark.parametrize("big", [False, True])  # on the event loop, and in the pool (a big image in the request)
def test_decode_many_keeps_each_images_own_error(classifier, big):
    truncated = _encoded("PNG", size=(100, 100))[:-30]  # its header reads fine; decoding fails
    images = [encode_png(color_pixels("red")[0]), b"", b"junk", truncated]
    if big:
        images.append(_encoded("JPEG", size=(400, 300)))
    good, empty, junk, cut, *rest = asyncio.run(classifier.decode_many(images))
    assert good.shape == (32, 32, 3) and [r.shape for r in rest] == ([(32, 32, 3)] if big else [])
    assert (empty.code, junk.code, cut.code) == ("empty", "unsupported_format", "corrupt")


# --- top-k, metadata ----------------------------------------------------------------------------------------------


def test_top_k_is_sorted_most_likely_first(classifier):
    predictions = classifier.top_k(np.array([0.2, 0.5, 0.3], np.float32), 2)
    assert [p["label"] for p in predictions] == ["green", "blue"]
    assert predictions[0] == {"label": "green", "index": 1, "probability": pytest.approx(0.5)}


@pytest.mark.parametrize("value", [0, 4, "x", "2.5", 2.0, True, None, "-1"])
def test_top_k_must_be_an_integer_within_the_classes(classifier, value):
    with pytest.raises(ApiError) as refused:
        classifier.check_top_k(value)
    assert (refused.value.status, refused.value.code) == (400, "invalid_top_k")


def test_top_k_accepts_integers_and_numeric_strings(classifier):
    assert classifier.check_top_k("3") == 3 and classifier.check_top_k(1) == 1
    assert classifier.default_top_k == 3  # 5, capped at the number of classes


def test_metadata_names_the_model_and_runtime(classifier, color_package):
    metadata = classifier.metadata()
    assert metadata["name"] == "color" and metadata["version"] == "1"
    assert metadata["classes"] == list(COLOR_CLASSES)
    assert metadata["test_time_augmentation"] == "none"  # a package written before the field existed
    assert (metadata["input"]["height"], metadata["input"]["width"]) == (32, 32)
    assert metadata["backend"] == "onnx" and metadata["execution_provider"] == CPU_PROVIDER
    assert metadata["sha256"] == classifier.package.manifest["files"]["model.onnx"]["sha256"]


def test_readiness_turns_false_while_a_model_call_is_stuck_and_back_once_it_finishes(tmp_path):
    async def scenario():
        package = make_color_package(tmp_path / "color")
        classifier = Classifier(ServiceSettings(model=str(package), device="cpu", request_timeout_s=0.2))
        await classifier.start()
        try:
            assert classifier.ready
            gate = threading.Event()
            predict = classifier.batcher.predict
            classifier.batcher.predict = lambda pixels: gate.wait(5) and predict(pixels)
            loop = asyncio.get_running_loop()
            call = asyncio.create_task(classifier.infer(color_pixels("red"), deadline=loop.time() + 5))
            await asyncio.sleep(0.4)  # the call has run longer than a request may wait
            assert not classifier.ready
            gate.set()
            probabilities = await call
            assert COLOR_CLASSES[int(np.argmax(probabilities[0]))] == "red"
            assert classifier.ready
        finally:
            await classifier.stop()

    asyncio.run(scenario())
