"""Triton Inference Server through PyTriton, its dynamic batcher in front of the same ONNX Runtime call.

PYTHONPATH=. PEER_PACKAGE=PKG PEER_THREADS=2 PEER_PORT=8000 PEER_GRPC_PORT=8001 [PEER_INSTANCES=1] \
    .cache/bench/peers/pytriton/venv/bin/python -m benchmarks.peers.pytriton_app

Run by PyTriton's own environment's interpreter (benchmarks/triton_comparison.py makes it: numpy 1, which Triton's
Python backend needs), with the repository on PYTHONPATH for the shared model code.

The model is served under the package's name with the service's v2 signature, so that one perf_analyzer command line
drives either server: input `pixels` UINT8 [-1, H, W, 3] (decoded RGB pixels), output `probabilities` FP32
[-1, num_classes]. Triton's settings (PyTriton's `ModelConfig`): dynamic batching up to MAX_BATCH_SIZE images (the
service's own largest model call) with a MAX_QUEUE_DELAY_US wait, the value of PyTriton's examples; PEER_INSTANCES
model instances (Triton's instance group, KIND_CPU; PyTriton runs one inference callable per instance in this
process), each an ONNX Runtime session of PEER_THREADS intra-op threads; Prometheus metrics off (nothing scrapes
them, and they would take a third port). HTTP on PEER_PORT, gRPC on PEER_GRPC_PORT, both on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import sysconfig
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

from benchmarks.peers.model import PeerModel
from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES

MAX_BATCH_SIZE = 64  # the service's VISIONSERVE_MAX_BATCH_SIZE default (service/settings.py)
MAX_QUEUE_DELAY_US = 100  # PyTriton's examples; Triton's own default is 0 (no wait)


class Instance:
    """One Triton model instance: its own ONNX Runtime session."""

    def __init__(self, package: str, threads: int) -> None:
        self.model = PeerModel(package, threads)

    @batch
    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        # (N, H, W, 3) uint8, the requests of one dynamic batch concatenated -> (N, C) float32
        return {OUTPUT_PROBABILITIES: self.model.run(inputs[INPUT_NAME])}


def library_path() -> str:
    """LD_LIBRARY_PATH with this interpreter's own libpython first, for the Python backend's stubs (one process per
    model instance, each embedding Python): they link libpython3.X by name, and the loader would otherwise find the
    system's (Debian's 3.11.2) and run it on this interpreter's standard library (pyenv's 3.11.7), which fails in
    multiprocessing at the first model load."""
    folders = [
        sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None,
        os.environ.get("LD_LIBRARY_PATH"),
    ]
    return os.pathsep.join(folder for folder in folders if folder)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ["LD_LIBRARY_PATH"] = library_path()  # inherited by tritonserver and its stubs
    package = os.environ["PEER_PACKAGE"]
    threads, instances = int(os.environ["PEER_THREADS"]), int(os.environ.get("PEER_INSTANCES", "1"))
    manifest = json.loads((Path(package) / "manifest.json").read_text())
    height, width = manifest["spec"]["input_size"]
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=int(os.environ["PEER_PORT"]),
        grpc_address="127.0.0.1",
        grpc_port=int(os.environ["PEER_GRPC_PORT"]),
        allow_metrics=False,
    )
    # PyTriton guards the statistics API with a token by default; perf_analyzer reads it (server-side figures) and
    # stops without it. The other guarded APIs stay guarded.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    # SIGTERM (the benchmark's stop) leaves through `with`, so that PyTriton stops Triton and deletes its workspace.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=manifest["name"],
            infer_func=[Instance(package, threads) for _ in range(instances)],
            inputs=[Tensor(name=INPUT_NAME, dtype=np.uint8, shape=(height, width, 3))],
            outputs=[
                Tensor(name=OUTPUT_PROBABILITIES, dtype=np.float32, shape=(len(manifest["spec"]["class_names"]),))
            ],
            config=ModelConfig(
                max_batch_size=MAX_BATCH_SIZE,
                batcher=DynamicBatcher(max_queue_delay_microseconds=MAX_QUEUE_DELAY_US),
            ),
        )
        triton.serve()


if __name__ == "__main__":
    main()
