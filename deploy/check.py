"""The container check: build the GPU and CPU images with `bentoml containerize`, run each with `docker run`, probe
them as a client would, stop them under load, and record sizes, times and answers.

    python -m deploy.check [--package packages/quick] [--images cpu gpu] [--gpus]

Needs a Docker engine (deploy/base_image.sh starts one and builds the base image offline where Docker Hub cannot be
reached) and a model package. Results: benchmarks/results/container_check.md and .json beside it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

from benchmarks.common import DEFAULT_ARCHIVE, machine, run_and_report
from benchmarks.servers import free_port
from deploy.bento import BENTOFILES, REPO, bentoml_env, build_bento, register_model

BASE_IMAGE = "python:3.11-slim"  # both bentofiles' docker.base_image
HOME = REPO / ".cache" / "container-check" / "bentoml"
RESULTS = REPO / "benchmarks" / "results" / "container_check.md"
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
STOP_GRACE_S = 30  # docker stop -t: the pod's terminationGracePeriodSeconds (deploy/kubernetes/deployment.yaml)
READY_TIMEOUT_S = 180
ARBITRARY_USER = "1000650000:0"  # a user id as OpenShift assigns one, in the root group
# BentoML's home where the manifests put it: under /tmp, the one writable path of a read-only root filesystem.
CONTAINER_BENTOML_HOME = "/tmp/bentoml"
# `docker run` as the Kubernetes manifests run the container (Pod Security Standards' restricted profile with a
# read-only root filesystem, /tmp a volume of its own) and deploy/compose.yaml does.
RESTRICTED_RUN = (
    "--read-only",
    "--tmpfs", "/tmp",
    "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges",
    "-e", f"BENTOML_HOME={CONTAINER_BENTOML_HOME}",
)  # fmt: skip
DRAIN_CLIENTS = 32
# Past the image's request-head timeout (VISIONSERVE_REQUEST_HEAD_TIMEOUT_S, 10 s by default) and its 1 s sweep.
SLOW_HEAD_WAIT_S = 30


class CheckError(RuntimeError):
    """A step of the check failed; the message says which and why."""


def docker(*args: str, timeout: float | None = None) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise CheckError(f"docker {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


def sample_test_images(archive: Path, per_class: int = 2) -> list[tuple[str, bytes]]:
    """(class name, JPEG bytes) of the first `per_class` test images of each class in the CIFAR-style archive."""
    chosen: dict[str, list[bytes]] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or "test" not in parts or not member.name.endswith(".jpg"):
                continue
            label = parts[-2]
            if len(chosen.setdefault(label, [])) < per_class:
                chosen[label].append(tar.extractfile(member).read())
    return [(label, blob) for label in sorted(chosen) for blob in chosen[label]]


def build_image(kind: str, home: Path) -> dict:
    """Build the Bento of `kind`'s bentofile and containerize it; the image's name, size and layers."""
    started = time.perf_counter()
    tag = build_bento(BENTOFILES[kind], home)
    # The classic builder (no buildx needed); host networking so pip and uv reach the index through the host.
    command = [sys.executable, "-m", "bentoml", "containerize", tag, "--opt", "network=host"]
    result = subprocess.run(
        command, cwd=REPO, env={**bentoml_env(home), "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise CheckError(f"bentoml containerize {tag} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    layers = []
    for line in docker("history", "--no-trunc", "--format", "{{json .}}", tag).splitlines():
        layer = json.loads(line)
        layers.append({"size": layer["Size"], "created_by": layer["CreatedBy"][-160:]})
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag))
    # What the install layer is made of: the largest installed packages, in MB.
    listing = "du -sm /app/.venv/lib/python3*/site-packages/* | sort -n | tail -8"
    packages = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c", listing).splitlines()
    largest = [{"mb": int(line.split()[0]), "path": line.split()[1].rsplit("/", 1)[-1]} for line in packages]
    return {
        "tag": tag,
        "bytes": size,
        "build_seconds": time.perf_counter() - started,
        "layers": layers,
        "largest_packages": largest[::-1],
    }


def wait_ready(url: str, container: str, started: float) -> float:
    while time.perf_counter() - started < READY_TIMEOUT_S:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        if docker("inspect", "-f", "{{.State.Running}}", container).strip() != "true":
            raise CheckError(f"{container} exited before it was ready:\n{docker('logs', '--tail', '40', container)}")
        time.sleep(0.2)
    raise CheckError(f"{container} not ready after {READY_TIMEOUT_S} s:\n{docker('logs', '--tail', '40', container)}")


def probe(url: str, metadata: dict, images: list[tuple[str, bytes]]) -> dict:
    """The answers a client gets: /classify, /classify_batch, a v2 infer to the model `metadata` (the service's
    /metadata) names, a bad image, and /metrics."""
    answers: dict = {}
    label, jpeg = images[0]
    response = httpx.post(f"{url}/classify", files={"image": ("test.jpg", jpeg, "image/jpeg")}, timeout=30)
    top = response.json()["predictions"][0] if response.status_code == 200 else None
    answers["classify"] = {"status": response.status_code, "true_label": label, "top": top}
    files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i, (_, blob) in enumerate(images)]
    response = httpx.post(f"{url}/classify_batch", files=files, timeout=30)
    results = response.json().get("results", []) if response.status_code == 200 else []
    correct = sum(r["predictions"][0]["label"] == label for r, (label, _) in zip(results, images, strict=False))
    answers["classify_batch"] = {"status": response.status_code, "images": len(images), "top1_correct": correct}
    name = metadata["name"]
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpeg).decode()]}]
    }
    response = httpx.post(f"{url}/v2/models/{name}/infer", json=body, timeout=30)
    answers["v2_infer"] = {
        "status": response.status_code,
        "outputs": [o["name"] for o in response.json().get("outputs", [])],
    }
    response = httpx.post(f"{url}/classify", content=b"not an image at all", headers={"content-type": "image/jpeg"})
    answers["bad_image"] = {"status": response.status_code, "body": response.json()}
    answers["metadata"] = {
        key: metadata[key] for key in ("name", "version", "device", "requested_device", "fallback_reason")
    }
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    answers["metrics"] = {
        "status": 200,
        "visionserve_series": sorted({line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
                                      if line.startswith("visionserve_")}),
    }  # fmt: skip
    return answers


def stop_under_load(url: str, container: str, images: list[tuple[str, bytes]]) -> dict:
    """`docker stop` while clients keep sending batches: every request sent before the stop must get an answer."""
    files = [("images", (f"{i}.jpg", blob, "image/jpeg")) for i, (_, blob) in enumerate(images)]
    stopping = threading.Event()
    outcomes: list[tuple[float, str]] = []  # (sent at, status or error name)

    def client() -> None:
        with httpx.Client(timeout=STOP_GRACE_S + 30) as session:
            while not stopping.is_set():
                sent = time.perf_counter()
                try:
                    outcome = str(session.post(f"{url}/classify_batch", files=files).status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                outcomes.append((sent, outcome))

    with ThreadPoolExecutor(DRAIN_CLIENTS) as pool:
        for _ in range(DRAIN_CLIENTS):
            pool.submit(client)
        time.sleep(3)  # every client has requests in flight
        memory = docker("stats", "--no-stream", "--format", "{{.MemUsage}}", container).strip()
        stop_started = time.perf_counter()
        stopping.set()
        docker("stop", "-t", str(STOP_GRACE_S), container, timeout=STOP_GRACE_S + 60)
        stopped_in = time.perf_counter() - stop_started
    before = [outcome for sent, outcome in outcomes if sent < stop_started]
    counts: dict[str, int] = {}
    for outcome in before:
        counts[outcome] = counts.get(outcome, 0) + 1
    exit_code = int(docker("inspect", "-f", "{{.State.ExitCode}}", container))
    return {
        "clients": DRAIN_CLIENTS,
        "memory_under_load": memory,
        "requests_sent_before_stop": len(before),
        "outcomes": counts,
        "unanswered": sum(n for outcome, n in counts.items() if not outcome.isdigit()),
        "stop_seconds": stopped_in,
        "grace_seconds": STOP_GRACE_S,
        "exit_code": exit_code,
    }


def starts(tag: str, *options: str) -> bool:
    """Whether the image, run with these `docker run` options, answers /readyz from inside the container (its own
    loopback: the options may leave it no network)."""
    name = f"visionserve-check-start-{free_port()}"
    docker("run", "-d", "--name", name, *options, tag)
    code = (
        "import time, urllib.request\n"
        "for _ in range(600):\n"
        "    try:\n"
        "        urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=1); print('ready'); break\n"
        "    except Exception: time.sleep(0.2)\n"
    )
    try:
        return docker("exec", name, "python", "-c", code, timeout=READY_TIMEOUT_S).strip() == "ready"
    finally:
        docker("rm", "-f", name)


def compose_command() -> list[str]:
    """Docker's compose plugin (`docker compose`) where it is installed, else the standalone `docker-compose`."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise CheckError("no docker compose: install Docker's compose plugin or docker-compose (Debian: docker-compose)")


def runs_under_compose(tag: str, image: tuple[str, bytes]) -> dict:
    """deploy/compose.yaml with this image on free host ports, as a user starts it: the time until its own health
    check calls the container healthy, one /classify through the published port, and `down`."""
    port, grpc_port = free_port(), free_port()
    tool = compose_command()
    compose = [*tool, "-f", str(COMPOSE_FILE), "-p", f"visionserve-check-{port}"]
    env = {**os.environ, "VISIONSERVE_IMAGE": tag, "VISIONSERVE_PUBLISH_HTTP": str(port),
           "VISIONSERVE_PUBLISH_GRPC": str(grpc_port)}  # fmt: skip
    version = subprocess.run([*tool, "version"], capture_output=True, text=True).stdout.splitlines()[0]

    def run_compose(*args: str) -> str:
        result = subprocess.run([*compose, *args], env=env, capture_output=True, text=True, timeout=READY_TIMEOUT_S)
        if result.returncode != 0:
            raise CheckError(f"{' '.join(tool)} {args[0]} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout

    started = time.perf_counter()
    run_compose("up", "-d")
    try:
        [container] = run_compose("ps", "-q").split()
        while (health := docker("inspect", "-f", "{{.State.Health.Status}}", container).strip()) != "healthy":
            if health == "unhealthy" or time.perf_counter() - started > READY_TIMEOUT_S:
                raise CheckError(f"compose: the container is {health}:\n{docker('logs', '--tail', '40', container)}")
            time.sleep(0.5)
        healthy_seconds = time.perf_counter() - started
        label, jpeg = image
        response = httpx.post(f"http://127.0.0.1:{port}/classify", files={"image": ("test.jpg", jpeg)}, timeout=30)
        top = response.json()["predictions"][0] if response.status_code == 200 else None
    finally:
        down_started = time.perf_counter()
        run_compose("down", "-t", str(STOP_GRACE_S))
    return {
        "tool": version,
        "healthy_seconds": healthy_seconds,
        "classify": {"status": response.status_code, "true_label": label, "top": top},
        "down_seconds": time.perf_counter() - down_started,
    }


def probe_grpc(address: str, metadata: dict, images: list[tuple[str, bytes]]) -> dict:
    """The Open Inference Protocol over gRPC, as Triton's client speaks it: readiness and one infer of encoded JPEGs
    to the model that `metadata` (the service's /metadata) names, read with its classes."""
    import grpc
    import numpy as np
    import tritonclient.grpc as grpcclient
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    model, classes = metadata["name"], metadata["classes"]
    client = grpcclient.InferenceServerClient(address)
    encoded = grpcclient.InferInput("images", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array([blob for _, blob in images], dtype=object))
    probabilities = client.infer(model, [encoded]).as_numpy("probabilities")
    top = [classes[i] for i in probabilities.argmax(axis=1)]
    with grpc.insecure_channel(address) as channel:  # what a Kubernetes grpc probe asks
        health_status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return {
        "ready": client.is_server_ready(),
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health_status),
        "images": len(images),
        "top1_correct": sum(t == label for t, (label, _) in zip(top, images, strict=True)),
    }


def hold_back_head(port: int) -> tuple[socket.socket, float]:
    """A connection that sends part of a request head and stops, as a slowloris client does; and when it opened."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=SLOW_HEAD_WAIT_S)
    connection.sendall(b"POST /classify HTTP/1.1\r\nHost: check\r\n")
    return connection, time.perf_counter()


def slow_head_answer(connection: socket.socket, opened: float) -> dict:
    """What the held-back head got: the status and code of the answer, and when the server closed the connection."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except OSError as exc:  # still open when the wait ran out
        return {"status": None, "error": type(exc).__name__}
    finally:
        connection.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return {
        "status": int(head.split()[1]) if head else None,
        "code": json.loads(body).get("code") if body else None,
        "closed_after_s": round(time.perf_counter() - opened, 1),
    }


def check_image(kind: str, image: dict, images: list[tuple[str, bytes]], gpus: bool) -> dict:
    port, grpc_port = free_port(), free_port()
    name = f"visionserve-check-{kind}-{port}"
    publish = ["-p", f"127.0.0.1:{port}:3000", "-p", f"127.0.0.1:{grpc_port}:8001"]
    run = ["run", "-d", "--name", name, *publish, *RESTRICTED_RUN, *(["--gpus", "all"] if gpus else [])]
    started = time.perf_counter()
    docker(*run, image["tag"])
    try:
        url = f"http://127.0.0.1:{port}"
        ready_seconds = wait_ready(url, name, started)
        user = docker("exec", name, "id", "-u").strip()
        held_back = hold_back_head(port)  # answered while the other probes run
        metadata = httpx.get(f"{url}/metadata", timeout=10).json()
        answers = probe(url, metadata, images)
        answers["grpc"] = probe_grpc(f"127.0.0.1:{grpc_port}", metadata, images)
        answers["slow_head"] = slow_head_answer(*held_back)
        drain = stop_under_load(url, name, images[:16])
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    offline = starts(image["tag"], "--network", "none")
    # OpenShift runs a container as an arbitrary user of group 0: the image's files must be readable to it.
    arbitrary_user = starts(image["tag"], "--user", ARBITRARY_USER, *RESTRICTED_RUN)
    return {"ready_seconds": ready_seconds, "uid": user, "answers": answers, "drain": drain,
            "offline_start": {"network": "none", "ready": offline},
            "arbitrary_uid_start": {"user": ARBITRARY_USER, "ready": arbitrary_user}}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    subprocess.run([str(REPO / "deploy" / "base_image.sh"), BASE_IMAGE], check=True)
    base_bytes = int(docker("image", "inspect", "-f", "{{.Size}}", BASE_IMAGE))
    if not (args.package / "manifest.json").is_file():
        raise CheckError(f"no model package at {args.package} (make export writes packages/quick)")
    shutil.rmtree(HOME, ignore_errors=True)
    register_model(args.package, HOME)
    images = sample_test_images(args.archive)
    results: dict = {
        "command": "python -m deploy.check " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "docker": docker("version", "-f", "{{.Server.Version}}").strip(),
        "package": json.loads((args.package / "manifest.json").read_text())["name"],
        "base_image": {"tag": BASE_IMAGE, "bytes": base_bytes},
        "images": {},
    }
    for kind in args.images:
        image = build_image(kind, HOME)
        image["added_bytes"] = image["bytes"] - base_bytes
        image.update(check_image(kind, image, images, args.gpus))
        if kind == "cpu":  # the compose file's default image
            image["compose"] = runs_under_compose(image["tag"], images[0])
        results["images"][kind] = image
        print(f"[{kind}] {image['tag']}: {image['bytes'] / 1e6:.0f} MB, ready in {image['ready_seconds']:.1f} s")
    return results


def slow_head(answer: dict) -> str:
    if "error" in answer:
        return f"NOT closed within {SLOW_HEAD_WAIT_S} s ({answer['error']})"
    got = f"{answer['status']} `{answer['code']}`" if answer["status"] else "no answer"
    return f"{got}, closed after {answer['closed_after_s']} s"


def markdown(results: dict) -> str:
    mb = 1e6
    lines = [
        "# Container check",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}  ",
        f"Machine: {results['machine']['nproc']} cores ({results['machine']['cpu_model']}), no GPU, Docker engine "
        f"{results['docker']}; load average at start {results['machine']['load_average_at_start']}  ",
        f"Model package: `{results['package']}`; base image `{results['base_image']['tag']}` "
        f"{results['base_image']['bytes'] / mb:.0f} MB",
        "",
        "| image | size | added to the base | build | `docker run` to /readyz | user | /classify | /classify_batch "
        "top-1 | v2 infer (HTTP; gRPC top-1) | bad image | a request head held back | no network at start "
        "| another user (OpenShift) | `docker stop` under load |",
        "|---|---:|---:|---:|---:|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, image in results["images"].items():
        a, drain = image["answers"], image["drain"]
        top = a["classify"]["top"] or {}
        lines.append(
            f"| {kind} (`{image['tag']}`) | {image['bytes'] / mb:.0f} MB | {image['added_bytes'] / mb:.0f} MB "
            f"| {image['build_seconds']:.0f} s | {image['ready_seconds']:.1f} s | uid {image['uid']} "
            f"| {a['classify']['status']}: {top.get('label')} {top.get('probability', 0):.2f} "
            f"(true: {a['classify']['true_label']}) "
            f"| {a['classify_batch']['status']}: {a['classify_batch']['top1_correct']}/{a['classify_batch']['images']} "
            f"| {a['v2_infer']['status']}; gRPC {a['grpc']['top1_correct']}/{a['grpc']['images']}, "
            f"health {a['grpc'].get('health', 'not asked')} "
            f"| {a['bad_image']['status']} `{a['bad_image']['body'].get('code')}` "
            f"| {slow_head(a['slow_head'])} "
            f"| {'ready' if image['offline_start']['ready'] else 'NOT ready'} "
            f"| {'ready' if image['arbitrary_uid_start']['ready'] else 'NOT ready'} "
            f"| {drain['requests_sent_before_stop']} requests sent before the stop: {drain['outcomes']}, "
            f"{drain['unanswered']} unanswered; stopped in {drain['stop_seconds']:.1f} s (grace {drain['grace_seconds']} s), "
            f"exit {drain['exit_code']}; memory under that load {drain['memory_under_load']} |"
        )
    for kind, image in results["images"].items():
        if compose := image.get("compose"):
            top = compose["classify"]["top"] or {}
            lines += [
                "",
                f"`deploy/compose.yaml` with the {kind} image ({compose['tool']}): healthy by its own health check "
                f"{compose['healthy_seconds']:.1f} s after `up -d`; /classify through the published port "
                f"{compose['classify']['status']}: {top.get('label')} {top.get('probability', 0):.2f} "
                f"(true: {compose['classify']['true_label']}); `down` in {compose['down_seconds']:.1f} s.",
            ]
    for kind, image in results["images"].items():
        lines += ["", f"## Layers of the {kind} image (newest first)", "", "| size | created by |", "|---:|---|"]
        for layer in image["layers"]:
            created = layer["created_by"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {layer['size']} | `{created}` |")
        largest = ", ".join(f"{p['path']} {p['mb']} MB" for p in image["largest_packages"])
        lines += ["", f"Largest installed packages: {largest}"]
        lines += ["", f"Metrics series: {', '.join(image['answers']['metrics']['visionserve_series']) or '(none)'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m deploy.check", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=REPO / "packages" / "quick", help="the model package to pack")
    parser.add_argument("--images", nargs="+", choices=sorted(BENTOFILES), default=["cpu", "gpu"], help="which images")
    parser.add_argument("--gpus", action="store_true", help="docker run --gpus all (a host with the NVIDIA toolkit)")
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-style archive of test JPEGs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown report (JSON beside it)")
    args = parser.parse_args(argv)
    args.argv = argv
    return run_and_report(run, markdown, args)


if __name__ == "__main__":
    raise SystemExit(main())
