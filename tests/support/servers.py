"""Real servers for tests: `bentoml serve service.service:ImageClassifier` in a subprocess on a free loopback port,
and a bare uvicorn server in a thread for tests of its HTTP protocol.

Also a deliberately slow variant of the colour package (a chain of matrix products that the answer does not
depend on), to observe warm-up, a busy model and a full queue from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import psutil
import uvicorn
from onnx import helper, numpy_helper

from benchmarks.servers import SERVICE, BentoServer, free_port
from inference.package import MANIFEST_NAME, OUTPUT_LOGITS, sha256_file
from tests.support.color_package import color_model, make_color_package

REPO = Path(__file__).resolve().parents[2]

# The VISIONSERVE_* settings of the shared `color_service` (tests/conftest.py) and of in-process apps: limits
# small enough to cross cheaply in tests; everything else at its default.
SERVICE_TEST_SETTINGS = {
    "VISIONSERVE_DEVICE": "auto",  # on a CPU-only machine: the fallback path, reported in /metadata
    "VISIONSERVE_MAX_BODY_BYTES": "500000",
    "VISIONSERVE_MAX_IMAGE_PIXELS": "1000000",
    "VISIONSERVE_MAX_BATCH_IMAGES": "8",
    "VISIONSERVE_MAX_QUEUE": "256",
    # One worker, whatever the machine's cores: tests count batches, queues and metrics of one process.
    "VISIONSERVE_WORKERS": "1",
    # No gRPC on Triton's 8001, which parallel test servers would share: tests/test_grpc.py gives it ports of its own.
    "VISIONSERVE_GRPC_PORT": "0",
}


@dataclass
class RunningServer:
    server: BentoServer
    package: Path  # the model package folder it serves

    @property
    def url(self) -> str:  # http://127.0.0.1:PORT
        return self.server.url

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process


def start_server(package: Path, work_dir: Path, settings: dict[str, str], wait_ready: bool = True) -> RunningServer:
    """Start the service on `package` with VISIONSERVE_* `settings`; wait for /readyz (or only /livez)."""
    env = {
        "VISIONSERVE_MODEL": str(package),
        "BENTOML_HOME": str(work_dir / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "True",
        **settings,
    }
    server = BentoServer(SERVICE, env, log_dir=work_dir)
    server.start("/readyz" if wait_ready else "/livez", timeout_s=120)
    return RunningServer(server, package)


def listener(reuse_port: bool) -> socket.socket:
    """A socket listening on a free loopback port: another program (reuse_port=False) or another server of the
    same user, whose sockets share their port with SO_REUSEPORT (True)."""
    held = socket.socket()
    if reuse_port:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def serve_exit(package: Path, settings: dict[str, str], work_dir: Path, port: int | None = None) -> tuple[int, str]:
    """Run `bentoml serve` as a user would (on a free port unless told one); (exit code, output) if it stops
    within a minute."""
    env = {**os.environ, "VISIONSERVE_MODEL": str(package), "BENTOML_HOME": str(work_dir / "bentoml"), **settings}
    command = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(port or free_port())]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def wait_for(running: RunningServer, path: str, timeout_s: float) -> None:
    running.server.wait_for(path, timeout_s)


def stop_server(running: RunningServer) -> None:
    running.server.stop()


def workers(pid: int) -> list[psutil.Process]:
    """The BentoML worker processes of the server whose `bentoml serve` process is `pid`."""
    children = psutil.Process(pid).children(recursive=True)
    return [p for p in children if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def wait_until(condition, what: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not {what} after {timeout_s} s")
        time.sleep(0.2)


def make_slow_color_package(root: Path, matmuls: int = 600, side: int = 512) -> Path:
    """The colour package whose model also multiplies a (side, side) matrix `matmuls` times (~3 ms each here
    on one thread, so about two seconds a call: longer than the server takes to answer its first request after
    its warm-up began, which the readiness test needs to see it unready).

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


async def slow_app(scope, receive, send) -> None:
    """Answers 200 after sleeping the query's seconds (`/?sleep=S`)."""
    if scope["type"] != "http":
        return
    await receive()
    query = dict(part.split("=") for part in scope["query_string"].decode().split("&") if part)
    await asyncio.sleep(float(query.get("sleep", 0)))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def serving(protocol: type) -> Iterator[int]:
    """uvicorn serving slow_app with `protocol` on a free loopback port, in a thread; yields the port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(slow_app, host="127.0.0.1", port=port, http=protocol, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
