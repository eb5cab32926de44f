"""The service against Triton Inference Server (through PyTriton) under Triton's own load tool, perf_analyzer.

    python -m benchmarks.triton_comparison [--models lesson-cnn resnet18] [--rounds 3]
        [--points 1:1 1:8 1:32 1:64 8:8 8:32] [--interval-ms 5000] [--max-trials 10] [--stability 10]
        [--triton-instances 1]

Both servers speak the Open Inference Protocol and serve the same random-weight package (the lesson CNN, cnn_bn, and
the CIFAR ResNet-18, as benchmarks/load_test.py builds them) under the same name and signature (`pixels` UINT8
[-1, H, W, 3] in, `probabilities` FP32 [-1, C] out), so one perf_analyzer command line drives either: HTTP, binary
tensors (perf_analyzer's default over HTTP), random pixels, `-b BATCH` images a request at `--concurrency-range
C:C`, windows of --interval-ms until three agree within --stability % (at most --max-trials windows), and `-x 1`,
the package's version; the report keeps to the client's figures. perf_analyzer's inferences/s count images.

- `service`: this service as benchmarks/perf_analyzer.py's `serve` starts it, with no tuning variable (it chooses
  its workers; service/defaults.py);
- `triton`: benchmarks/peers/pytriton_app.py: PyTriton PYTRITON_VERSION, i.e. Triton's own server binary (HTTP and
  gRPC front ends, the dynamic batcher: max_batch_size 64, max_queue_delay 100 us) calling the same ONNX Runtime
  session (benchmarks/peers/model.py, the service's runtime settings) through PyTriton's Python backend, one model
  instance with every core's intra-op threads unless --triton-instances says otherwise.

PyTriton runs in its own virtual environment (VENV, made once by `install_pytriton`), not in pip's --target folder
as benchmarks/peer_comparison.py installs its peers: the Python backend's stub (Triton 2.51's, in PyTriton's wheel)
embeds an interpreter that ignores PYTHONPATH and imports from the interpreter's own environment, and there it found
the project's numpy 2, with which every answer failed ("output tensor shape does not match size of output"); with
numpy 1, which PyTriton pins (< 2), the answers are right. The venv holds PyTriton and inference/'s own dependencies
(ONNX Runtime, Pillow, simplejpeg, onnx) at the project environment's versions, with numpy 1.

For each model, the answers of both servers to 16 decoded CIFAR-10 test images are checked against a direct ONNX
Runtime call (same top class, probabilities within 1e-5) before measuring. Then each round starts each server alone
in turn (the order alternating by round), measures every (batch, concurrency) point and stops it; the report gives
the medians of the rounds and, per point, the median over rounds of that round's service / Triton ratio. Run on a
quiet machine: perf_analyzer and the server share its cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import httpx
import numpy as np

from benchmarks.common import (
    CACHE,
    CIFAR10_CLASSES,
    DEFAULT_ARCHIVE,
    LOGS,
    RESULTS,
    describe_package,
    machine,
    read_test_jpegs,
    run_and_report,
)
from benchmarks.perf_analyzer import PERF_ANALYZER_VERSION, measure, prepare, serve
from benchmarks.servers import REPO, free_port, wait_until_answering
from inference.package import INPUT_NAME, OUTPUT_PROBABILITIES
from inference.runtime import cpu_threads

PYTRITON_VERSION = "0.7.0"
VENV = CACHE / "peers" / "pytriton" / "venv"
# inference/'s own dependencies, installed in PyTriton's environment at this environment's versions (numpy aside).
SHARED_REQUIREMENTS = ("onnxruntime-gpu", "onnxruntime", "pillow", "simplejpeg", "onnx")
SERVERS = ("service", "triton")
DEFAULT_POINTS = ((1, 1), (1, 8), (1, 32), (1, 64), (8, 8), (8, 32))  # (images a request, concurrency)
CHECK_IMAGES = 16
TOLERANCE = 1e-5


# ---- Triton through PyTriton -----------------------------------------------------------------------------------


def shared_requirements() -> list[str]:
    """NAME==VERSION of each of SHARED_REQUIREMENTS installed here (never both ONNX Runtime packages)."""
    pinned = []
    for name in SHARED_REQUIREMENTS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
    return pinned


def install_pytriton(venv: Path = VENV) -> Path:
    """The interpreter of PyTriton's virtual environment, made once (again when the requirements change)."""
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    requirements = [f"nvidia-pytriton=={PYTRITON_VERSION}", *shared_requirements()]
    if marker.is_file() and marker.read_text().split() == requirements and python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    command = [str(python), "-m", "pip", "install", "--quiet", *requirements]
    print(f"[triton] {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    marker.write_text(" ".join(requirements) + "\n")
    return python


def installed_versions(python: Path, names: tuple[str, ...] = ("nvidia-pytriton", "tritonclient", "numpy")) -> dict:
    script = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    return json.loads(subprocess.run([str(python), "-c", script, *names], capture_output=True, check=True).stdout)


class TritonServer:
    """benchmarks/peers/pytriton_app.py in PyTriton's environment on free ports: started, waited for, stopped."""

    def __init__(self, python: Path, package: Path, label: str, instances: int) -> None:
        self.python, self.package, self.instances = python, package, instances
        self.model = json.loads((package / "manifest.json").read_text())["name"]
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = LOGS / f"triton-{label}.log"
        self.process: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PEER_PACKAGE": str(self.package),
            "PEER_THREADS": str(max(1, cpu_threads() // self.instances)),
            "PEER_INSTANCES": str(self.instances),
            "PEER_PORT": str(self.port),
            "PEER_GRPC_PORT": str(self.grpc_port),
        }

    def start(self, timeout_s: float = 180) -> TritonServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(self.python), "-m", "benchmarks.peers.pytriton_app"], cwd=REPO, env=self.env(), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        ready = f"{self.url}/v2/models/{self.model}/ready"
        try:
            wait_until_answering(
                self.process, lambda: httpx.get(ready).status_code == 200, timeout_s, "PyTriton", self.log_path
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to PyTriton alone, which stops Triton (its exit timeout is 30 s) and deletes its workspace; the
        whole process group only if that does not end it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a stub or tritonserver left behind

    def settings(self) -> dict:
        """What Triton reports it runs: its version and the model's batching and instances."""
        config = httpx.get(f"{self.url}/v2/models/{self.model}/config").json()
        return {
            "triton_version": httpx.get(f"{self.url}/v2").json()["version"],
            "max_batch_size": config["max_batch_size"],
            "dynamic_batching": config["dynamic_batching"],
            "instance_group": [{"kind": g["kind"], "count": g["count"]} for g in config["instance_group"]],
            "intra_op_threads_per_instance": int(self.env()["PEER_THREADS"]),
        }


# ---- checks and measurements -----------------------------------------------------------------------------------


def check_answers(url: str, model: str, package: Path, images: list[bytes]) -> dict:
    """A server's v2 answers (UINT8 pixels, binary tensors) against a direct ONNX Runtime call on the same pixels."""
    import tritonclient.http

    from benchmarks.peers.model import PeerModel

    reference = PeerModel(package, 1)
    pixels = np.stack([reference.decode(image) for image in images])  # (N, H, W, 3) uint8
    expected = reference.run(pixels)
    client = tritonclient.http.InferenceServerClient(url.removeprefix("http://"))
    tensor = tritonclient.http.InferInput(INPUT_NAME, list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    output = tritonclient.http.InferRequestedOutput(OUTPUT_PROBABILITIES, binary_data=True)
    got = client.infer(model, [tensor], outputs=[output]).as_numpy(OUTPUT_PROBABILITIES)
    client.close()
    if got is None or got.shape != expected.shape:
        raise RuntimeError(f"{url} answered shape {None if got is None else got.shape}, expected {expected.shape}")
    if not np.array_equal(got.argmax(axis=1), expected.argmax(axis=1)):
        raise RuntimeError(f"{url}'s top classes differ from ONNX Runtime's")
    worst = float(np.abs(got - expected).max())
    if worst > TOLERANCE:
        raise RuntimeError(f"{url}'s probabilities differ from ONNX Runtime's by {worst:.2e}")
    return {"images": len(images), "max_probability_difference": worst}


def measure_points(args: argparse.Namespace, command: list[str], model: str, version: str, url: str) -> list[dict]:
    address = url.removeprefix("http://")
    return [
        {
            "batch_size": batch,
            **measure(
                command,
                model,
                address,
                "http",
                concurrency,
                args.interval_ms,
                args.max_trials,
                args.stability,
                batch_size=batch,
                model_version=version,
            ),
        }
        for batch, concurrency in args.points
    ]


def measure_model(
    args: argparse.Namespace, command: list[str], python: Path, label: str, package: Path, images: list[bytes]
) -> dict:
    """Each round starts each server alone (the order alternating), checks its answers in the first round, measures
    every point and stops it."""
    manifest = json.loads((package / "manifest.json").read_text())
    model, version = manifest["name"], str(manifest["version"])  # "1", as PyTriton's
    runs, checks, settings = [], {}, {}
    for index in range(args.rounds):
        for name in SERVERS if index % 2 == 0 else SERVERS[::-1]:
            if name == "service":
                server, _ = serve(package, f"triton-comparison-{label}-service", None)
            else:
                server = TritonServer(python, package, label, args.triton_instances)
            server.start()
            try:
                if name not in checks:
                    checks[name] = check_answers(server.url, model, package, images)
                    settings[name] = service_settings(server.url) if name == "service" else server.settings()
                for entry in measure_points(args, command, model, version, server.url):
                    runs.append({"round": index + 1, "server": name, **entry})
            finally:
                server.stop()
    return {
        "package": describe_package(package),
        "answers": checks,
        "settings": settings,
        "runs": runs,
        "summary": summarize(runs),
    }


def service_settings(url: str) -> dict:
    metadata = httpx.get(f"{url}/metadata").json()
    return {
        "workers": metadata["workers"],
        "intra_op_threads": metadata.get("intra_op_threads"),
        "batching": metadata.get("batching"),
    }


# ---- figures ---------------------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> list[dict]:
    """Per (batch, concurrency): each server's infer/s by round and their medians, and the median over the rounds
    where both measured of that round's service / Triton ratio (paired: both ran in the same round). A failed
    measurement counts in neither."""
    rates: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    for run in runs:
        point = rates.setdefault((run["batch_size"], run["concurrency"]), {name: {} for name in SERVERS})
        if "error" not in run:
            point[run["server"]][run["round"]] = run["infer_per_s"]
    summary = []
    for (batch, concurrency), by_server in sorted(rates.items()):
        paired = sorted(set(by_server["service"]) & set(by_server["triton"]))
        ratios = [by_server["service"][r] / by_server["triton"][r] for r in paired if by_server["triton"][r] > 0]
        summary.append(
            {
                "batch_size": batch,
                "concurrency": concurrency,
                "rounds": {name: [by_server[name][r] for r in sorted(by_server[name])] for name in SERVERS},
                "median_infer_per_s": {
                    name: median(by_server[name].values()) if by_server[name] else None for name in SERVERS
                },
                "service_over_triton": median(ratios) if ratios else None,
            }
        )
    return summary


def run(args: argparse.Namespace) -> dict:
    from benchmarks.random_weights import random_package

    command = prepare()
    python = install_pytriton()
    archs = {"lesson-cnn": "cnn_bn", "resnet18": "resnet18"}
    packages = {
        label: random_package(CACHE, archs[label], CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0]
        for label in args.models
    }
    images = read_test_jpegs(args.data, CHECK_IMAGES)
    return {
        "command": " ".join(["python -m benchmarks.triton_comparison", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "perf_analyzer": {"version": PERF_ANALYZER_VERSION, "command": command},
        "pytriton_environment": installed_versions(python),
        "settings": {
            "points": [list(point) for point in args.points],
            "rounds": args.rounds,
            "measurement_interval_ms": args.interval_ms,
            "max_trials": args.max_trials,
            "stability_percentage": args.stability,
            "triton_instances": args.triton_instances,
        },
        "models": {
            label: measure_model(args, command, python, label, package, images) for label, package in packages.items()
        },
    }


def _rate(value: float | None) -> str:
    return "failed" if value is None else f"{value:,.1f}"


def markdown(results: dict) -> str:
    settings, machine_info = results["settings"], results["machine"]
    versions = results["pytriton_environment"]
    lines = [
        "# The service against Triton (PyTriton) under perf_analyzer",
        "",
        f"`{results['command']}` on {results['date']}; {machine_info['nproc']} cores, {machine_info['cpu_model']}, "
        f"load average at start {machine_info['load_average_at_start']} (perf_analyzer shares the cores with the "
        "server).",
        "",
        f"perf_analyzer {results['perf_analyzer']['version']} over HTTP with binary tensors, random UINT8 `pixels`, "
        f"`-b BATCH --concurrency-range C:C`, windows of {settings['measurement_interval_ms']} ms until three agree "
        f"within {settings['stability_percentage']}% (at most {settings['max_trials']}); infer/s counts images. "
        f"{settings['rounds']} round(s); in each, each server is started alone in turn (the order alternating) and "
        "measured at every point. PyTriton "
        f"{versions.get('nvidia-pytriton')} (numpy {versions.get('numpy')} in its environment). Both servers' answers "
        "to 16 decoded CIFAR-10 test images equal a direct ONNX Runtime call (checked before measuring).",
        "",
    ]
    for label, model in results["models"].items():
        service, triton = model["settings"].get("service", {}), model["settings"].get("triton", {})
        workers = service.get("workers") or {}
        lines += [
            f"## {label}: {model['package']['name']} ({model['package']['arch']}, {model['package']['weights']})",
            "",
            f"- service: {workers.get('workers')} worker(s) ({workers.get('reason')}), "
            f"{service.get('intra_op_threads')} intra-op thread(s), batching {json.dumps(service.get('batching'))};",
            f"- Triton {triton.get('triton_version')}: max_batch_size {triton.get('max_batch_size')}, "
            f"dynamic batching {json.dumps(triton.get('dynamic_batching', {}).get('max_queue_delay_microseconds'))} "
            f"us max queue delay (preferred sizes {triton.get('dynamic_batching', {}).get('preferred_batch_size')}), "
            f"instances {json.dumps(triton.get('instance_group'))}, "
            f"{triton.get('intra_op_threads_per_instance')} intra-op thread(s) each.",
            "",
            "| batch | concurrency | service infer/s by round | Triton infer/s by round | service median | "
            "Triton median | service / Triton |",
            "|---:|---:|---|---|---:|---:|---:|",
        ]
        for point in model["summary"]:
            rounds = {
                name: " / ".join(f"{rate:,.1f}" for rate in point["rounds"][name]) or "failed" for name in SERVERS
            }
            ratio = point["service_over_triton"]
            lines.append(
                f"| {point['batch_size']} | {point['concurrency']} | {rounds['service']} | {rounds['triton']} | "
                f"{_rate(point['median_infer_per_s']['service'])} | {_rate(point['median_infer_per_s']['triton'])} | "
                f"{'' if ratio is None else f'**{ratio:.2f}**'} |"
            )
        failures = [run for run in model["runs"] if "error" in run]
        lines += ["", "service / Triton: the median over rounds of each round's ratio.", ""]
        if failures:
            lines += ["Failed measurements:", ""]
            lines += [
                f"- round {run['round']} {run['server']} b={run['batch_size']} c={run['concurrency']}: "
                f"{run['error'][-200:].replace(chr(10), ' ')}"
                for run in failures
            ]
            lines.append("")
        first = {(r["server"], r["batch_size"], r["concurrency"]): r for r in model["runs"] if r["round"] == 1}
        latencies = [
            f"b={b} c={c}: "
            + ", ".join(
                f"{name} {first[(name, b, c)]['p50_us'] / 1000:.2f} / {first[(name, b, c)]['p99_us'] / 1000:.2f}"
                for name in SERVERS
                if "p50_us" in first.get((name, b, c), {})
            )
            for b, c in settings["points"]
        ]
        lines += ["p50 / p99 ms, round 1: " + "; ".join(latencies) + ".", ""]
    return "\n".join(lines)


# ---- the command line ------------------------------------------------------------------------------------------


def point(text: str) -> tuple[int, int]:
    """'BATCH:CONCURRENCY' -> (batch, concurrency)."""
    try:
        batch, concurrency = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH:CONCURRENCY (e.g. 8:32), got {text!r}") from None
    if batch < 1 or concurrency < 1:
        raise argparse.ArgumentTypeError(f"batch and concurrency must be >= 1, got {text!r}")
    return batch, concurrency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.triton_comparison", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["lesson-cnn", "resnet18"], choices=["lesson-cnn", "resnet18"],
        help="random-weight packages to serve (default both)",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (packages, checks)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument(
        "--points", type=point, nargs="+", default=list(DEFAULT_POINTS),
        help="BATCH:CONCURRENCY pairs (default 1:1 1:8 1:32 1:64 8:8 8:32)",
    )  # fmt: skip
    parser.add_argument("--interval-ms", type=int, default=5000, help="perf_analyzer's -p window (default 5000)")
    parser.add_argument("--max-trials", type=int, default=10, help="perf_analyzer's -r (default 10)")
    parser.add_argument("--stability", type=int, default=10, help="perf_analyzer's -s percentage (default 10)")
    parser.add_argument(
        "--triton-instances", type=int, default=1, help="Triton model instances, the cores' threads split among them"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_comparison.md", help="markdown (JSON beside)")
    return run_and_report(run, markdown, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
