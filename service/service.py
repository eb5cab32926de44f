"""The BentoML service: wires the served models to the HTTP routes; `bentoml serve service.service:ImageClassifier`.

The models are VISIONSERVE_MODEL's one package, or every model of VISIONSERVE_REPOSITORY (docs/models.md), each with
its own Classifier in service.repository, which also loads new versions while serving.

BentoML provides the server, workers, /livez, /readyz, /metrics, the API page (/, /docs.json), the model store and
build/containerize; the routes are a Starlette app mounted with `bentoml.asgi_app` for full control of parsing,
limits and JSON errors, and their OpenAPI description reaches BentoML's page through a second, schema-only app
(service.openapi). API keys and CORS, when set, are ASGI middleware around BentoML's whole app.
Batching happens in-process (service.batcher), not through BentoML's batchable APIs, whose self-calls loop back
over HTTP with arrays as JSON.
The Open Inference Protocol over gRPC (service.grpc_server) runs in each worker beside the HTTP routes, started
and stopped by the startup and shutdown hooks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import bentoml
import yaml

from inference.package import PackageError
from inference.runtime import DeviceUnavailableError, check_device
from service import auth, bentoml_config, grpc_server, http_protocol, listening, openapi
from service.app import asgi_middlewares, attach, create_app
from service.auth import AccessControl
from service.defaults import WorkerChoice, WorkerChoiceError, choose_workers
from service.repository import ModelRepository
from service.repository_layout import PackageList, PackageSource, PlannedVersion, RepositoryError, open_source, plan
from service.settings import ServiceSettings, SettingsError

# A built Bento holds this code under <bento>/src/ and its description in <bento>/bento.yaml.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
BENTO_INFO = SOURCE_ROOT.parent / "bento.yaml"


def bento_defaults() -> dict[str, str]:
    """The Bento's environment variables when this code runs from a built Bento, else none.

    Its container image sets them; read here too, so that `bentoml serve TAG` outside a container serves the models
    the Bento was built with. Variables set in the environment win."""
    if SOURCE_ROOT.name != "src" or not BENTO_INFO.is_file():
        return {}
    info = yaml.safe_load(BENTO_INFO.read_text()) or {}
    return {entry["name"]: str(entry["value"]) for entry in info.get("envs") or [] if entry.get("value") is not None}


def store_tags(settings: ServiceSettings) -> list[str]:
    """VISIONSERVE_MODEL's model-store tags (its other references are folders): `bentoml build` packs these."""
    if settings.repository:
        return []
    return [reference for reference in settings.model_references if not Path(reference).is_dir()]


def checked_configuration() -> tuple[ServiceSettings, PackageSource, list[PlannedVersion], AccessControl, WorkerChoice]:
    """The settings (the worker count chosen when not set), where the models come from, every version to serve
    (verified), the API keys and how the worker count was chosen, or exit with the one-line reason.

    Runs at import, so in `bentoml serve`'s own process before any worker starts: a bad variable, a missing or
    unreadable key file, a missing, tampered or unknown package (or one without the chosen backend's file), a bad
    repository (a folder name that is not a name, a repository.json key it does not know, a model it names that is
    missing), or device=cuda where CUDA cannot be used stops the command, instead of a worker that fails in __init__
    and that BentoML restarts forever. Each worker re-verifies its own copy.
    """
    try:
        settings = ServiceSettings.from_env({**bento_defaults(), **os.environ})
        access = auth.configured()  # the same keys as auth.check_authorization's, for any other server
        source = open_source(settings)
        workers = choose_workers(settings, list(source.packages.values()) if isinstance(source, PackageList) else [])
        settings = dataclasses.replace(settings, workers=workers.workers)
        planned = plan(source, settings)
        if settings.device == "cuda":  # `auto` falls back to the CPU, `cuda` must work or not start at all
            for entry in planned:
                check_device(entry.package.root, entry.settings.backend, settings.device)
    except (
        SettingsError,
        PackageError,
        RepositoryError,
        FileNotFoundError,
        DeviceUnavailableError,
        WorkerChoiceError,
    ) as exc:
        raise SystemExit(f"visionserve: cannot serve: {exc}") from None
    return settings, source, planned, access, workers


SETTINGS, SOURCE, PLANNED, ACCESS, WORKERS = checked_configuration()
app = create_app()
# Before BentoML starts uvicorn in this process: connections that hold a request head back are closed, old ones are
# asked to reconnect, and the number of connections is bounded by the hard limit on open files, not the soft one.
http_protocol.install(SETTINGS.request_head_timeout_s, SETTINGS.connection_max_age_s)
http_protocol.raise_open_files_limit()

# The container image's base; the bentofiles add the Python packages (GPU or CPU). BentoML apt-installs
# build-essential, git and gnupg into every image of a distro it knows, for packages built from source;
# this service installs only prebuilt wheels, so its image names no such distro.
CONTAINER_IMAGE = bentoml.images.Image(base_image="python:3.11-slim", python_version="3.11", distro="prebuilt-wheels")


# Mounted after `app`, whose fallback route answers every path first: this one only carries the schema.
@bentoml.asgi_app(
    openapi.schema_app(openapi.Contract.of(SETTINGS, PLANNED[0].package, ACCESS, [entry.name for entry in PLANNED])),
    path="/",
    name="openapi",
)
@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="visionserve",
    image=CONTAINER_IMAGE,
    # VISIONSERVE_WORKERS, else chosen from the cores and the model's cost (service.defaults): each worker has its
    # own queue and cores / workers runtime threads.
    workers=SETTINGS.workers,
    # Our own deadline answers 504 (408 for a body still arriving) with a JSON body; BentoML's timeout is only the
    # backstop behind it.
    traffic={"timeout": SETTINGS.request_timeout_s + 5},
    # The Bento records the models it was built with; the tags themselves are packed through `models` below.
    envs=[{"name": "VISIONSERVE_MODEL", "value": SETTINGS.model}],
    # No access log and no spans for the prediction routes unless BentoML's configuration asks for them
    # (service/bentoml_config.py).
    **bentoml_config.SERVICE_DEFAULTS,
)
class ImageClassifier:
    def __init__(self) -> None:
        # Creates the runtime session of every version verified at import; fails loudly (e.g. device=cuda without
        # a usable GPU) so the server never starts half-working.
        self.repository = ModelRepository.from_plan(SETTINGS, SOURCE, PLANNED)
        self.repository.workers = WORKERS.describe()
        attach(app, self.repository, ACCESS)
        self._warm_up: asyncio.Task | None = None
        self._grpc: grpc_server.GrpcServer | None = None

    @bentoml.on_deployment
    def check_listen_addresses() -> None:
        # In `bentoml serve`, before any worker starts: a port that cannot be served stops the server with one line,
        # where BentoML would print a traceback (HTTP) or restart workers failing to bind it forever (gRPC).
        try:
            listening.check(SETTINGS)
        except listening.CannotListen as exc:
            raise SystemExit(f"visionserve: cannot serve: {exc}") from None

    @bentoml.on_startup
    async def start_batching(self) -> None:
        # Warm up in the background: /livez answers at once, /readyz turns 200 after the warm-up batches. Polling
        # the repository for new versions (VISIONSERVE_REPOSITORY_POLL_S) starts once every model is warm.
        self._warm_up = asyncio.get_running_loop().create_task(self.repository.start(SETTINGS.repository_poll_s))
        # The Open Inference Protocol over gRPC, on this worker's event loop and models: its requests join the
        # HTTP requests' batches. Listens at once, as /livez answers; ServerReady waits for the warm-up.
        self._grpc = await grpc_server.start(self.repository, ACCESS)

    @bentoml.on_shutdown
    async def stop_batching(self) -> None:
        # gRPC first: its requests in flight still find the batchers running, and none can outlast the timeout.
        await grpc_server.stop(self._grpc, SETTINGS.request_timeout_s)
        await self.repository.stop()

    def __is_ready__(self) -> bool:
        return self.repository.ready

    def __is_alive__(self) -> bool:
        return self.repository.failure is None


# `bentoml build` packs every model the service declares: each store tag VISIONSERVE_MODEL names.
ImageClassifier.models.extend(bentoml.models.BentoModel(tag) for tag in store_tags(SETTINGS))

for _middleware, _options in asgi_middlewares(SETTINGS, ACCESS):
    ImageClassifier.add_asgi_middleware(_middleware, **_options)
