"""The service's Starlette app in the test process: no server, no subprocess, no socket.

httpx.AsyncClient over httpx.ASGITransport, called from sync tests on one event loop (the one the Classifier's
batcher was started on), over service.app's create_app() + attach(app, Classifier).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.app import attach, create_app
from service.auth import AccessControl
from service.classifier import Classifier
from service.repository import ModelRepository
from service.repository_layout import open_source, plan
from service.settings import ServiceSettings
from tests.support.servers import SERVICE_TEST_SETTINGS


class InProcessClient:
    """httpx.AsyncClient over httpx.ASGITransport, for sync tests: every call runs on one event loop, the one that
    the classifier's batcher was started on."""

    def __init__(self, app) -> None:
        self._runner = asyncio.Runner()
        transport = httpx.ASGITransport(app=app)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://service", timeout=30)

    def run(self, coroutine):
        return self._runner.run(coroutine)

    def get(self, url: str, **kwargs) -> httpx.Response:
        return self.run(self._client.get(url, **kwargs))

    def post(self, url: str, **kwargs) -> httpx.Response:
        return self.run(self._client.post(url, **kwargs))

    def close(self) -> None:
        self.run(self._client.aclose())
        self._runner.close()


@contextmanager
def in_process_service(package: Path, settings: dict[str, str] = SERVICE_TEST_SETTINGS) -> Iterator[InProcessClient]:
    """A client of the service's app over a started Classifier of `package`, with VISIONSERVE_* `settings` (by default
    those of the `color_service` server); the classifier is stopped afterwards."""
    classifier = Classifier(ServiceSettings.from_env({**settings, "VISIONSERVE_MODEL": str(package)}))
    app = create_app()
    attach(app, classifier)
    client = InProcessClient(app)
    client.run(classifier.start())
    try:
        yield client
    finally:
        client.run(classifier.stop())
        client.close()


@contextmanager
def in_process_repository(
    root: Path, settings: dict[str, str] = SERVICE_TEST_SETTINGS, access: AccessControl | None = None
) -> Iterator[tuple[InProcessClient, ModelRepository]]:
    """(client, repository): the service's app over every model of the repository folder `root`, as service.service
    builds it (VISIONSERVE_REPOSITORY), warmed up; `access` says whose keys may load and unload."""
    service_settings = ServiceSettings.from_env({**settings, "VISIONSERVE_REPOSITORY": str(root)})
    source = open_source(service_settings)
    repository = ModelRepository.from_plan(service_settings, source, plan(source, service_settings))
    app = create_app()
    attach(app, repository, access)
    client = InProcessClient(app)
    client.run(repository.start())
    try:
        yield client, repository
    finally:
        client.run(repository.stop())
        client.close()
