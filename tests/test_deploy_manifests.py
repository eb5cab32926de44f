"""The Kubernetes and compose manifests name only what the service has: its variables, port and health paths, and a
grace period that covers its drain."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from deploy.check import CONTAINER_BENTOML_HOME, RESTRICTED_RUN, STOP_GRACE_S
from service.settings import ENV_PREFIX, ServiceSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
SERVICE_PORT = 3000  # BentoML's default, which the images EXPOSE
GRPC_PORT = ServiceSettings.grpc_port
VARIABLES = {ENV_PREFIX + field.name.upper() for field in fields(ServiceSettings)}
BENTOML_HOME = "BENTOML_HOME"  # the one variable of BentoML's that the manifests set
PRE_STOP_SLEEP_S = 5
# The oldest Kubernetes release the manifests are checked against, besides the newest schemas kubernetes-validate has.
OLDEST_KUBERNETES = "1.31.0"


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def containers() -> list[tuple[str, dict, dict]]:
    """(file name, pod spec, container) of every Deployment."""
    found = []
    for path in KUBERNETES:
        for doc in documents(path):
            if doc["kind"] == "Deployment":
                pod = doc["spec"]["template"]["spec"]
                found += [(path.name, pod, container) for container in pod["containers"]]
    return found


def resources() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in KUBERNETES for doc in documents(path)]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.utils.latest_version()])
@pytest.mark.parametrize(("name", "resource"), resources(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_every_resource_is_valid_kubernetes(name, resource, version):
    # Strict: a misspelt or misplaced field, which kubectl apply would refuse or silently drop, fails here.
    kubernetes_validate.validate(resource, version, strict=True)


def test_the_schema_check_finds_a_misplaced_field():
    [deployment, *_] = documents(DEPLOY / "kubernetes" / "deployment.yaml")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    container["readOnlyRootFilesystem"] = container["securityContext"].pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST_KUBERNETES, strict=True)


def test_there_is_a_cpu_and_a_gpu_deployment_and_each_has_a_service():
    names = {name for name, _, _ in containers()}
    assert names == {"deployment.yaml", "deployment-gpu.yaml"}
    for path in KUBERNETES:
        kinds = [doc["kind"] for doc in documents(path)]
        if "Deployment" in kinds:
            assert "Service" in kinds, path.name


@pytest.mark.parametrize(("name", "pod", "container"), containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_deployment_names_only_what_the_service_has(name, pod, container):
    env = {item["name"]: item["value"] for item in container.get("env", [])}
    assert env.pop(BENTOML_HOME) == CONTAINER_BENTOML_HOME
    assert set(env) <= VARIABLES, f"{name}: unknown variables {set(env) - VARIABLES}"
    ServiceSettings.from_env(env)  # every value parses and passes the service's own checks
    assert [port["containerPort"] for port in container["ports"]] == [SERVICE_PORT, GRPC_PORT]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The grace period covers the preStop pause and the longest request, and is what the container check stops with.
    timeout_s = float(env.get(f"{ENV_PREFIX}REQUEST_TIMEOUT_S", ServiceSettings.request_timeout_s))
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRE_STOP_SLEEP_S)]
    assert pod["terminationGracePeriodSeconds"] == STOP_GRACE_S >= PRE_STOP_SLEEP_S + timeout_s + 5
    limits = container["resources"]["limits"]
    if f"{ENV_PREFIX}THREADS" in env and f"{ENV_PREFIX}WORKERS" in env:
        cores = int(env[f"{ENV_PREFIX}THREADS"]) * int(env[f"{ENV_PREFIX}WORKERS"])
        assert cores <= int(limits["cpu"]), f"{name}: more runtime threads than the CPU limit"
    assert ("nvidia.com/gpu" in limits) == (name == "deployment-gpu.yaml")


@pytest.mark.parametrize(("name", "pod", "container"), containers(), ids=lambda v: v if isinstance(v, str) else "")
def test_a_deployment_meets_the_restricted_pod_security_profile_with_a_read_only_root(name, pod, container):
    # What a namespace labelled pod-security.kubernetes.io/enforce=restricted admits, and what the container
    # check's RESTRICTED_RUN gives `docker run`: the root filesystem read-only, /tmp the writable volume.
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    [mount] = container["volumeMounts"]
    [volume] = pod["volumes"]
    assert mount == {"name": volume["name"], "mountPath": "/tmp"} and "emptyDir" in volume
    assert CONTAINER_BENTOML_HOME.startswith("/tmp/")
    assert {"--read-only", "no-new-privileges", "/tmp", f"BENTOML_HOME={CONTAINER_BENTOML_HOME}"} <= set(RESTRICTED_RUN)


def test_the_autoscaler_scales_the_cpu_deployment():
    [hpa] = documents(DEPLOY / "kubernetes" / "hpa.yaml")
    [deployment, *_] = documents(DEPLOY / "kubernetes" / "deployment.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # a rollout or a node loss never leaves no replica


def test_the_cpu_replicas_keep_serving_through_rollouts_drains_and_a_node_loss():
    deployment, _, budget = documents(DEPLOY / "kubernetes" / "deployment.yaml")
    pods = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # A drain takes one replica at a time, and the budget covers exactly the Deployment's pods.
    assert budget["kind"] == "PodDisruptionBudget" and budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == pods
    [spread] = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["labelSelector"]["matchLabels"] == pods
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still runs every replica


def test_compose_names_only_what_the_service_has():
    [service] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"].values()
    environment = dict(service["environment"])
    assert environment.pop(BENTOML_HOME) == CONTAINER_BENTOML_HOME
    assert set(environment) <= VARIABLES
    ServiceSettings.from_env(environment)
    assert service["read_only"] and service["tmpfs"] == ["/tmp"] and service["cap_drop"] == ["ALL"]
    assert service["ports"] == [
        f"${{VISIONSERVE_PUBLISH_HTTP:-{SERVICE_PORT}}}:{SERVICE_PORT}",
        f"${{VISIONSERVE_PUBLISH_GRPC:-{GRPC_PORT}}}:{GRPC_PORT}",
    ]
    assert service["stop_grace_period"] == f"{STOP_GRACE_S}s"
    # `bentoml containerize` tags the image with the Bento's version only: a default tag would name no image.
    assert service["image"].startswith("${VISIONSERVE_IMAGE:?")
    assert "/readyz" in " ".join(service["healthcheck"]["test"])


@pytest.mark.e2e
def test_every_path_the_manifests_probe_or_scrape_answers(color_service):
    paths = {"/metrics"}  # the pods' prometheus.io/path annotation
    for _, _, container in containers():
        paths |= {container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe", "startupProbe")}
    for path in sorted(paths):
        assert httpx.get(color_service.url + path, timeout=10).status_code == 200, path
