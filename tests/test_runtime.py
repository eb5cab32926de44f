"""Predictor: package loading, device choice with a checked CUDA fallback, and input validation."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inference import runtime
from inference.package import PackageError
from inference.runtime import CPU_PROVIDER, DeviceUnavailableError, Predictor, cpu_threads
from tests.support.color_package import COLOR_CLASSES, color_pixels, cuda_session_works, make_color_package

REPO = Path(__file__).resolve().parents[1]

CUDA_WORKS = cuda_session_works()


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return make_color_package(tmp_path_factory.mktemp("runtime") / "color")


def test_the_cores_counted_are_those_this_process_may_use(monkeypatch):
    assert 1 <= cpu_threads() <= len(os.sched_getaffinity(0))
    # Every cap loky knows lowers the count: a cgroup's CPU quota (a container's --cpus) as this variable does.
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert cpu_threads() == 1


def test_predicts_probabilities_per_image_in_order(package_dir):
    predictor = Predictor.from_path(package_dir, device="cpu")
    pixels = np.concatenate([color_pixels(c) for c in ("blue", "red", "green", "red")])
    probabilities = predictor.predict(pixels)
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, len(COLOR_CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(axis=1)] == ["blue", "red", "green", "red"]


@pytest.mark.skipif(CUDA_WORKS, reason="a working GPU is present: there is no fallback to see")
def test_auto_falls_back_to_cpu_and_says_why(package_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="inference.runtime"):
        predictor = Predictor.from_path(package_dir, device="auto")
    assert predictor.info.device == "cpu" and predictor.info.provider == CPU_PROVIDER
    assert predictor.info.requested_device == "auto" and predictor.info.fallback_reason
    assert "running on the CPU" in caplog.text
    predictor.warm_up()


@pytest.mark.skipif(runtime.CUDA_PROVIDER not in ort.get_available_providers(), reason="a CPU-only onnxruntime")
def test_without_the_nvidia_driver_cuda_is_not_tried_and_the_reason_says_so(package_dir, monkeypatch, capfd):
    monkeypatch.setattr(runtime, "nvidia_driver_loads", lambda: False)
    predictor = Predictor.from_path(package_dir, device="auto")
    assert predictor.info.fallback_reason.endswith("no NVIDIA driver (libcuda.so.1; a container needs --gpus)")
    assert "onnxruntime" not in capfd.readouterr().err  # ONNX Runtime's own attempt logs its failure there
    with pytest.raises(DeviceUnavailableError, match="device=cuda was requested but .* no NVIDIA driver"):
        Predictor.from_path(package_dir, device="cuda")


@pytest.mark.skipif(CUDA_WORKS, reason="a working GPU is present")
def test_cuda_fails_loudly_without_a_gpu(package_dir):
    with pytest.raises(DeviceUnavailableError, match="device=cuda"):
        Predictor.from_path(package_dir, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_WORKS, reason="needs a CUDA GPU")
def test_cuda_provider_is_really_active_and_matches_cpu(package_dir):
    gpu = Predictor.from_path(package_dir, device="cuda")
    cpu = Predictor.from_path(package_dir, device="cpu")
    assert gpu.info.provider == "CUDAExecutionProvider"
    pixels = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(gpu.predict(pixels), cpu.predict(pixels), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_WORKS, reason="needs a CUDA GPU")
def test_tf32_is_off_unless_asked_for(package_dir):
    assert Predictor.from_path(package_dir, device="cuda").info.tf32 is False
    assert Predictor.from_path(package_dir, device="cuda", tf32=True).info.tf32 is True


def test_tf32_has_no_effect_on_the_cpu(package_dir):
    assert Predictor.from_path(package_dir, device="cpu", tf32=True).info.tf32 is False


def test_cpu_is_used_without_fallback_note(package_dir):
    info = Predictor.from_path(package_dir, device="cpu").info
    assert (info.device, info.fallback_reason, info.intra_op_threads >= 1) == ("cpu", None, True)


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((1, 32, 32, 3), dtype=np.float32),
        np.zeros((32, 32, 3), dtype=np.uint8),
        np.zeros((1, 16, 16, 3), dtype=np.uint8),
        np.zeros((1, 32, 32, 4), dtype=np.uint8),
        np.zeros((0, 32, 32, 3), dtype=np.uint8),
    ],
)
def test_wrong_inputs_are_refused(package_dir, pixels):
    with pytest.raises(ValueError, match="pixels must"):
        Predictor.from_path(package_dir, device="cpu").predict(pixels)


def test_unknown_device_and_missing_backend(package_dir):
    with pytest.raises(ValueError, match="unknown device"):
        Predictor.from_path(package_dir, device="tpu")
    with pytest.raises(PackageError, match="no torchscript model"):
        Predictor.from_path(package_dir, backend="torchscript")


@pytest.mark.slow  # a child process that imports ONNX Runtime and probes CUDA: seconds
def test_check_device_reports_in_a_child_process_whether_the_device_works(package_dir):
    from inference.runtime import check_device

    check_device(package_dir, "onnx", "cpu")  # no error: the CPU always works
    if CUDA_WORKS:
        check_device(package_dir, "onnx", "cuda")
    else:
        with pytest.raises(DeviceUnavailableError, match=r"^device=cuda was requested but CUDAExecutionProvider"):
            check_device(package_dir, "onnx", "cuda")
    with pytest.raises(DeviceUnavailableError, match="checking device=cpu failed: .*PackageError"):
        check_device(package_dir.parent / "no-such-package", "onnx", "cpu")


@pytest.mark.skipif(sys.platform != "linux", reason="ONNX Runtime's telemetry queue is a Linux file")
@pytest.mark.parametrize(("setting", "queued"), [(None, False), ("0", True)], ids=["default", "allowed"])
def test_onnx_runtime_records_nothing_for_upload_unless_allowed(tmp_path, setting, queued):
    # Importing onnxruntime records the process (OS, executable path, a device id) in a queue for upload; importing
    # inference first turns that off. ORT_DISABLE_TELEMETRY=0 allows it, which shows where the queue would be.
    # The queue goes under XDG_CACHE_HOME when that is set, else under HOME's .cache: both point into tmp_path. The
    # child gets no other variable, since ONNX Runtime records nothing where CI=true or a CI service's variable is set.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    package = make_color_package(tmp_path / "color")
    code = f"from inference.runtime import Predictor; Predictor.from_path({str(package)!r}, device='cpu')"
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert [path.name for path in tmp_path.rglob("onnxruntime.db")] == (["onnxruntime.db"] if queued else [])
