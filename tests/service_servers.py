"""Real servers for tests: `bentoml serve service.service:ImageClassifier` in a subprocess on a free loopback port.

Also a deliberately slow variant of the colour package (a chain of matrix products that the answer does not
depend on), to observe warm-up, a busy model and a full queue from outside.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from inference.package import MANIFEST_NAME, OUTPUT_LOGITS, sha256_file
from tests.color_package import color_model, make_color_package

REPO = Path(__file__).resolve().parents[1]
SERVICE = "service.service:ImageClassifier"


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    package: Path  # the model package folder it serves
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, work_dir: Path, settings: dict[str, str], wait_ready: bool = True) -> RunningServer:
    """Start the service on `package` with VISIONSERVE_* `settings`; wait for /readyz (or only /livez)."""
    port = free_port()
    env = {
        **os.environ,
        "VISIONSERVE_MODEL": str(package),
        "BENTOML_HOME": str(work_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        **settings,
    }
    log_path = work_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                SERVICE,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop_server ends the workers too
        )
    server = RunningServer(f"http://127.0.0.1:{port}", package, process, log_path)
    try:
        wait_for(server, "/readyz" if wait_ready else "/livez", timeout_s=120)
    except BaseException:
        stop_server(server)
        raise
    return server


def wait_for(server: RunningServer, path: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{server.url}{path} not 200 after {timeout_s} s:\n{server.log_tail()}")


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=15)


def make_slow_color_package(root: Path, matmuls: int = 200, side: int = 512) -> Path:
    """The colour package whose model also multiplies a (side, side) matrix `matmuls` times (~5 ms each here).

    The product depends on the input (so ONNX Runtime cannot fold it away) and is added times zero to the
    logits: answers are the colour model's, only slower, whatever the batch size.
    """
    make_color_package(root, name="slow-color")
    model = color_model((32, 32))
    graph = model.graph
    *fast_nodes, softmax = list(graph.node)
    for node in fast_nodes:
        if OUTPUT_LOGITS in node.output:
            node.output[0] = "fast_logits"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.eye(side, dtype=np.float32), "eye"),
            numpy_helper.from_array(np.array([side, side], np.int64), "side"),
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
        ]
    )
    heavy = [
        helper.make_node("ReduceSum", ["channel_means"], ["total"], keepdims=0),
        helper.make_node("Expand", ["total", "side"], ["product_0"]),
        *(helper.make_node("MatMul", [f"product_{i}", "eye"], [f"product_{i + 1}"]) for i in range(matmuls)),
        helper.make_node("ReduceSum", [f"product_{matmuls}"], ["heavy"], keepdims=0),
        helper.make_node("Mul", ["heavy", "zero"], ["nothing"]),
        helper.make_node("Add", ["fast_logits", "nothing"], [OUTPUT_LOGITS]),
    ]
    del graph.node[:]
    graph.node.extend([*fast_nodes, *heavy, softmax])
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "model.onnx"))
    manifest_path = root / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.onnx"].update(
        sha256=sha256_file(root / "model.onnx"), bytes=(root / "model.onnx").stat().st_size
    )
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return root
