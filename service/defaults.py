"""The number of worker processes when VISIONSERVE_WORKERS is not set, chosen from the cores and the model's cost.

A cheap model's throughput is bounded by the Python work each request costs on its worker's one event loop
(reading, decoding, batching, answering), not by the model: one worker per core serves more. A compute-bound model
is bounded by the cores, which one worker's runtime threads already use, and one queue makes fuller batches. The
model's cost is measured in a short-lived child process (the process that starts the workers holds no runtime of
its own): one image a call on one thread, the median of a few calls. `bentoml serve`'s own process decides, logs the
choice, and hands it to its workers in the environment they inherit; /metadata reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from inference.package import ModelPackage
from inference.runtime import cpu_threads
from service.settings import ENV_PREFIX, ServiceSettings

# The choice made by `bentoml serve`'s process, inherited by its workers (JSON of WorkerChoice).
CHOICE_VARIABLE = ENV_PREFIX + "WORKERS_CHOSEN"
# Below this many milliseconds an image on one thread, more event loops raise throughput; above it the model's
# own cost dominates, the gain fades, and a lone request on a worker's share of the threads takes longer
# (benchmarks/results/defaults.md measures models on either side).
CHEAP_MODEL_MS = 5.0
# Each worker holds its own session and buffers: more than this many copies is memory rarely worth spending.
MAX_AUTO_WORKERS = 8


class WorkerChoiceError(RuntimeError):
    """The model's cost could not be measured; the message says why."""


@dataclass(frozen=True)
class WorkerChoice:
    workers: int
    chosen_by: str  # "VISIONSERVE_WORKERS" or "auto"
    reason: str
    configuration: str = ""  # what the choice was made for: a worker takes it only for the same configuration

    def describe(self) -> dict:
        return {"workers": self.workers, "chosen_by": self.chosen_by, "reason": self.reason}


def configuration_key(settings: ServiceSettings) -> str:
    return json.dumps([settings.model, settings.repository, settings.backend, settings.device, cpu_threads()])


def choose_workers(settings: ServiceSettings, packages: list[ModelPackage]) -> WorkerChoice:
    """VISIONSERVE_WORKERS if set; else the choice inherited from `bentoml serve`'s process; else a new one."""
    if settings.workers:
        return WorkerChoice(settings.workers, "VISIONSERVE_WORKERS", "set")
    key = configuration_key(settings)
    inherited = os.environ.get(CHOICE_VARIABLE)
    if inherited:
        choice = WorkerChoice(**json.loads(inherited))
        if choice.configuration == key:
            return choice
    choice = _auto(settings, packages, key)
    # Printed, not logged: this runs at import in `bentoml serve`'s process, before its logging shows our INFO.
    print(f"visionserve: {choice.workers} worker(s), chosen automatically: {choice.reason}", file=sys.stderr)
    os.environ[CHOICE_VARIABLE] = json.dumps(asdict(choice))
    return choice


def _auto(settings: ServiceSettings, packages: list[ModelPackage], key: str) -> WorkerChoice:
    cores = cpu_threads()
    if settings.repository:
        return WorkerChoice(1, "auto", "a repository folder: its load and unload routes reach one worker", key)
    if cores == 1:
        return WorkerChoice(1, "auto", "one core", key)
    costs = [model_call_cost(package.root, settings.backend, settings.device) for package in packages]
    if any(device == "cuda" for device, _ in costs):
        return WorkerChoice(1, "auto", "the model runs on the GPU: one queue makes the fullest batches", key)
    milliseconds = max(ms for _, ms in costs)
    if milliseconds < CHEAP_MODEL_MS:
        workers = min(cores, MAX_AUTO_WORKERS)
        reason = (
            f"a cheap model ({milliseconds:.2f} ms an image on one thread, under {CHEAP_MODEL_MS:g} ms): "
            f"one worker per core ({cores} cores, at most {MAX_AUTO_WORKERS})"
        )
        return WorkerChoice(workers, "auto", reason, key)
    reason = (
        f"a compute-bound model ({milliseconds:.1f} ms an image on one thread): one worker, its runtime threads on "
        f"all {cores} cores"
    )
    return WorkerChoice(1, "auto", reason, key)


def model_call_cost(package_root: Path, backend: str, device: str, timeout_s: float = 120) -> tuple[str, float]:
    """(device used, median milliseconds of a one-image call on one thread), measured in a child process."""
    source_root = Path(__file__).resolve().parents[1]  # the folder holding the `service` and `inference` packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source_root), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "service.defaults", str(package_root), backend, device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=source_root)
    except subprocess.TimeoutExpired:
        raise WorkerChoiceError(f"measuring the model's cost took more than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise WorkerChoiceError(f"measuring the model's cost to choose the workers failed: {lines[-1]}")
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return measured["device"], measured["ms"]


def _measure(package_root: str, backend: str, device: str) -> dict:
    import time

    import numpy as np

    from inference.package import load_package
    from inference.runtime import Predictor

    predictor = Predictor(load_package(package_root), backend=backend, device=device, intra_op_threads=1)
    pixels = np.zeros((1, *predictor.input_shape), dtype=np.uint8)
    predictor.predict(pixels)  # the first call pays for lazy initialisation
    times = []
    deadline = time.perf_counter() + 0.5
    while len(times) < 5 or (len(times) < 50 and time.perf_counter() < deadline):
        started = time.perf_counter()
        predictor.predict(pixels)
        times.append((time.perf_counter() - started) * 1000)
    return {"device": predictor.info.device, "ms": sorted(times)[len(times) // 2]}


if __name__ == "__main__":
    print(json.dumps(_measure(*sys.argv[1:4])))
