"""`bentoml serve TARGET` in a subprocess on a free loopback port: started, waited for, stopped; and its memory.

Shared by the benchmarks (which time the start to /readyz) and the tests (which talk HTTP to the real server).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
SERVICE = "service.service:ImageClassifier"  # the real service, as `bentoml serve` names it
NOOP_SERVICE = "benchmarks.noop_service:NoopClassifier"  # the framework's floor (benchmarks/noop_service.py)
NOOP_SERVICE_SETTINGS = "VISIONSERVE_NOOP_SERVICE_SETTINGS"  # =1: the no-op with the service's framework settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def peak_memory(pid: int) -> Iterator[dict]:
    """While the block runs, the RSS of process `pid` and all its children every 100 ms: the dict yielded gets the
    first sample as `before` and the largest as `peak`, in bytes."""
    stop, peaks = threading.Event(), {}

    def sample() -> None:
        root = psutil.Process(pid)
        while not stop.wait(0.1):
            try:
                rss = root.memory_info().rss + sum(p.memory_info().rss for p in root.children(recursive=True))
            except psutil.Error:
                continue
            peaks.setdefault("before", rss)
            peaks["peak"] = max(peaks.get("peak", 0), rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()


def wait_until_answering(
    process: subprocess.Popen, answers: Callable[[], bool], timeout_s: float, name: str, log_path: Path
) -> None:
    """Until `answers()` is true (a connection refused or reset counts as not yet); RuntimeError if the process
    exits first or the time runs out. For peer servers, whose readiness each takes its own request to see."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited at start; see {log_path}")
        try:
            if answers():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not answer within {timeout_s:.0f} s; see {log_path}")


class BentoServer:
    """One `bentoml serve` process group on 127.0.0.1, its output in `log_dir`/NAME.log.

    `start()` (or `with`) launches it and waits until `ready_path` answers 200; `ready_seconds` is the time
    that took. The server runs in its own process group so that `stop()` ends its workers too, and only them.
    """

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        log_dir: Path,
        name: str | None = None,
        python: str | Path = sys.executable,
        cwd: Path = REPO,
    ) -> None:
        self.target = target
        # gRPC off unless `env` asks for it (on a port of its own): these servers run beside others, and the service
        # refuses to start on a gRPC port that is taken (its default 8001, by a demo or another test's server).
        self.env = {"VISIONSERVE_GRPC_PORT": "0", **env}
        self.python = str(python)  # an interpreter that can import bentoml (the Bento test's has nothing else)
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name or f"server-{self.port}"
        self.log_path = log_dir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.ready_seconds: float | None = None

    def start(self, ready_path: str = "/readyz", timeout_s: float = 180.0) -> BentoServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            self.python, "-m", "bentoml", "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_for(ready_path, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.perf_counter() - started
        print(f"[{self.name}] ready in {self.ready_seconds:.1f} s at {self.url}", flush=True)
        return self

    def wait_for(self, path: str, timeout_s: float) -> None:
        """Until `path` answers 200; an error with the log's tail if the server exits or the time runs out."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not 200 after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def __enter__(self) -> BentoServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
