"""Runtimes for model packages: ONNX Runtime (CUDA with a checked CPU fallback) or TorchScript, behind one Predictor."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES, ModelPackage, load_package
from inference.spec import ModelSpec

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# ONNX Runtime's QDQ propagation moves an int8 graph's QuantizeLinear above a MaxPool, which then runs on
# uint8 NCHW in a generic kernel: 62% of the lesson CNN's int8 time, its int8 convolution 8%. Without it
# the pool runs in the fast float or NHWC kernels (int8 at batch 64: 0.4x -> 1.8x of float; ResNet-18
# unchanged). Float graphs have no quantise nodes for it to move.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"]
# TF32, on by default in ONNX Runtime's CUDA provider and cuDNN, rounds convolution inputs to 10-bit mantissas:
# on an H100 it moved the lesson CNN's probabilities by up to 5e-4 from the CPU's, over the export gate's 1e-4.
# So the GPU serves the float32 arithmetic that the gate verified, unless `tf32=True` trades that for speed
# (ResNet-18 at batch 256 on an H100: about 4x; benchmarks/results/gpu/README.md).


class DeviceUnavailableError(RuntimeError):
    """`device="cuda"` was asked for and CUDA cannot be used; the message says why."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What is really running, as opposed to what was asked for (ONNX Runtime falls back silently)."""

    backend: str  # onnx | onnx-int8 | torchscript
    requested_device: str  # auto | cuda | cpu
    device: str  # cuda | cpu: the device in use
    provider: str  # CUDAExecutionProvider | CPUExecutionProvider | torch
    fallback_reason: str | None  # why CUDA is not used although auto asked for it; None otherwise
    intra_op_threads: int
    tf32: bool = False  # TF32 convolutions and matrix products on the GPU (ONNX Runtime's CUDA provider only)


def cpu_threads() -> int:
    """The cores this process may use: the fewest of the machine's, its CPU affinity (taskset, a cpuset) and its
    cgroup's CPU quota rounded up (a container run with --cpus sees every core of the host otherwise)."""
    from loky import cpu_count

    return cpu_count()


class Predictor:
    """One loaded model: `predict` maps raw pixels (N, H, W, 3) uint8 RGB to probabilities (N, C) float32.

    Thread-safe: ONNX Runtime's and TorchScript's run calls may be made from several threads at once.
    """

    def __init__(
        self,
        package: ModelPackage,
        *,
        backend: str = "onnx",
        device: str = "auto",
        intra_op_threads: int | None = None,
        tf32: bool = False,
    ) -> None:
        """tf32: let ONNX Runtime's CUDA provider use TF32 (faster on Ampere and later GPUs, outputs no longer
        within the export gate's 1e-4 of float32). No effect on the CPU, nor on TorchScript, whose exported
        graph keeps float32 convolutions."""
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; valid: {', '.join(DEVICES)}")
        self.package = package
        self.spec: ModelSpec = package.spec
        threads = intra_op_threads or cpu_threads()
        model_path = package.model_path(backend)
        if backend == "torchscript":
            self._run, self.info = _torchscript_runner(model_path, backend, device, threads)
        else:
            self._run, self.info = _onnx_runner(model_path, backend, device, threads, tf32)
        if self.info.fallback_reason:
            log.warning("CUDA requested (device=auto) but not used: %s; running on the CPU", self.info.fallback_reason)

    @classmethod
    def from_path(cls, root: str | Path, **kwargs) -> Predictor:
        return cls(load_package(root), **kwargs)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        height, width = self.spec.input_size
        return (height, width, 3)

    def check_input(self, pixels: np.ndarray) -> None:
        """Raise ValueError unless `pixels` is a non-empty (N, H, W, 3) uint8 array of the model's size."""
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be a uint8 array, got {getattr(pixels, 'dtype', type(pixels).__name__)}")
        if pixels.ndim != 4 or pixels.shape[1:] != self.input_shape or pixels.shape[0] < 1:
            raise ValueError(
                f"pixels must have shape (N>=1, {', '.join(map(str, self.input_shape))}), got {pixels.shape}"
            )

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        self.check_input(pixels)
        return self._run(np.ascontiguousarray(pixels))

    def warm_up(self, batch_size: int = 1) -> None:
        """Run once so that the first request doesn't pay for lazy initialisation (allocators, CUDA kernels)."""
        self.predict(np.zeros((batch_size, *self.input_shape), dtype=np.uint8))


def onnx_session(path: Path, providers: list[str], threads: int, tf32: bool = False, profile_prefix: str | None = None):
    """An ONNX Runtime session with the settings every ONNX path uses: the service, batch jobs, the export
    gate and the benchmarks measure the same thing. TF32 stays off on a GPU unless `tf32` (see above).
    `profile_prefix`: record ONNX Runtime's per-node profile, written by `end_profiling()` to PREFIX_<date>.json."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads would otherwise spin and take CPU from request parsing and decoding.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cuda_options = {"use_tf32": "1" if tf32 else "0"}
    with_options = [(p, cuda_options) if p == CUDA_PROVIDER else p for p in providers]
    return ort.InferenceSession(
        str(path), sess_options=options, providers=with_options, disabled_optimizers=DISABLED_OPTIMIZERS
    )


# Run by check_device in a child process: exit 3 with the reason when the device cannot be used.
_DEVICE_CHECK = """
import sys
from inference.runtime import DeviceUnavailableError, Predictor
try:
    Predictor.from_path(sys.argv[1], backend=sys.argv[2], device=sys.argv[3], intra_op_threads=1)
except DeviceUnavailableError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def check_device(package_root: Path, backend: str, device: str, timeout_s: float = 300) -> None:
    """Raise DeviceUnavailableError unless `backend` of the package can run on `device`, found out by creating the
    runtime in a short-lived child process: a supervisor (`bentoml serve`'s own process, which starts the workers)
    learns that device=cuda cannot work before any worker starts, without holding a GPU context of its own."""
    source_root = Path(__file__).resolve().parents[1]  # the folder holding the `inference` package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source_root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", _DEVICE_CHECK, str(package_root), backend, device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceUnavailableError(f"checking device={device} took more than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        reason = lines[-1] if done.returncode == 3 else f"checking device={device} failed: {lines[-1]}"
        raise DeviceUnavailableError(reason)


def _onnx_runner(path: Path, backend: str, device: str, threads: int, tf32: bool):
    import onnxruntime as ort

    fallback_reason = None
    if device in ("auto", "cuda"):
        problem = None
        if CUDA_PROVIDER not in ort.get_available_providers():
            problem = f"this onnxruntime build has no {CUDA_PROVIDER} (install onnxruntime-gpu)"
        elif not nvidia_driver_loads():
            # Said before ONNX Runtime tries: its own attempt logs an error and a warning on every start.
            problem = f"{CUDA_PROVIDER} cannot run: no NVIDIA driver (libcuda.so.1; a container needs --gpus)"
        else:
            try:
                # Load CUDA/cuDNN from the nvidia-* wheels when they are installed (e.g. beside torch);
                # a system-wide CUDA needs nothing from this.
                ort.preload_dlls(msvc=False)
                cuda_session = onnx_session(path, [CUDA_PROVIDER, CPU_PROVIDER], threads, tf32)
                # Ask the session what it really got: without a driver or libraries it silently keeps only the CPU.
                if cuda_session.get_providers()[0] == CUDA_PROVIDER:
                    in_use = cuda_session.get_provider_options()[CUDA_PROVIDER].get("use_tf32") == "1"
                    info = RuntimeInfo(backend, device, "cuda", CUDA_PROVIDER, None, threads, in_use)
                    return _onnx_run(cuda_session), info
                problem = f"{CUDA_PROVIDER} could not be initialised (no GPU, driver or CUDA libraries)"
            except Exception as exc:  # ORT raises its own Fail/RuntimeException types
                problem = f"{CUDA_PROVIDER} failed: {str(exc).splitlines()[0][:200]}"
        if device == "cuda":
            raise DeviceUnavailableError(f"device=cuda was requested but {problem}")
        fallback_reason = problem
    cpu_session = onnx_session(path, [CPU_PROVIDER], threads)
    return _onnx_run(cpu_session), RuntimeInfo(backend, device, "cpu", CPU_PROVIDER, fallback_reason, threads)


def nvidia_driver_loads() -> bool:
    """Whether the NVIDIA driver's CUDA library can be loaded (where that is not Linux, assumed so)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _onnx_run(session):
    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_PROBABILITIES], {INPUT_NAME: pixels})[0]

    return run


def _torchscript_runner(path: Path, backend: str, device: str, threads: int):
    import torch  # only this backend needs torch

    fallback_reason = None
    use_cuda = torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise DeviceUnavailableError("device=cuda was requested but torch.cuda.is_available() is False")
    if device == "auto" and not use_cuda:
        fallback_reason = "torch.cuda.is_available() is False"
    if device == "cpu":
        use_cuda = False
    torch_device = torch.device("cuda" if use_cuda else "cpu")
    torch.set_num_threads(threads)
    # The archive's sha256 was verified against the manifest before this point.
    module = torch.jit.load(str(path), map_location=torch_device).eval()

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probabilities = module(torch.from_numpy(pixels).to(torch_device))
            if isinstance(probabilities, (tuple, list)):
                probabilities = probabilities[0]
            return probabilities.float().cpu().numpy()

    info = RuntimeInfo(backend, device, torch_device.type, "torch", fallback_reason, threads)
    return run, info
