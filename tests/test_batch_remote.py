"""Batch scoring --url mode: the service's /classify_batch contract, retries with backoff, whole-request refusals.

Two servers run in a thread with uvicorn on a free port: the real service routes (service.app over a
Classifier of the colour package), and a small stand-in speaking the same contract whose failures the tests
script (503/429 with Retry-After, 413 for too many images, a 500 on one image).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from batch.engines.base import EngineError, EngineSettings, ServedModel
from batch.engines.remote import JobRefused, RemoteEngine, RemoteError, RetryPolicy, served_model
from batch.inputs import Record
from batch.job import BatchJob, engine_settings
from inference.imaging import ImageDecodeError, decode_image
from inference.runtime import Predictor
from tests.support.batch_files import (
    BAD_FILES,
    LABELS,
    color_files,
    color_png,
    read_output,
    run_cli,
    write_folder,
)
from tests.support.color_package import COLOR_CLASSES, make_color_package

pytestmark = pytest.mark.e2e


def url_settings(url: str) -> EngineSettings:
    """One request at a time to `url`, top-1, everything else as a job's defaults resolve it."""
    job = BatchJob(input="unused", output=Path("unused.parquet"), url=url, top_k=1, workers=1)
    return engine_settings(job, "url", None, top_k=1)


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_color_package(tmp_path_factory.mktemp("remote") / "color")


@contextmanager
def serve(app, on_start=None, on_stop=None) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; on_start/on_stop (coroutine functions) run on its loop."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[sock]),), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    if on_start is not None:
        asyncio.run_coroutine_threadsafe(on_start(), loop).result(timeout=60)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        if on_stop is not None:
            asyncio.run_coroutine_threadsafe(on_stop(), loop).result(timeout=60)
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class StandIn:
    """/classify_batch as the service contract describes it, with scripted failures."""

    def __init__(self, package: Path, *, busy: int = 0, retry_after: str = "0", max_images: int = 64) -> None:
        self.predictor = Predictor.from_path(package, device="cpu")
        self.busy = busy  # answer this many requests with 503 first
        self.retry_after = retry_after
        self.max_images = max_images
        self.requests: list[int] = []  # images per request, refused ones included

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/metadata", self.metadata, methods=["GET"]),
                Route("/classify_batch", self.classify_batch, methods=["POST"]),
            ]
        )

    async def metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({"name": "color", "version": "1"})

    async def classify_batch(self, request: Request) -> JSONResponse:
        form = await request.form()
        uploads = form.getlist("images")
        self.requests.append(len(uploads))
        if self.busy:
            self.busy -= 1
            return JSONResponse(
                {"error": "queue full", "code": "overloaded"},
                503,
                {"Retry-After": self.retry_after},
            )
        if len(uploads) > self.max_images:
            return JSONResponse({"error": "too many images", "code": "too_many_images"}, 413)
        results = []
        for index, upload in enumerate(uploads):
            data = await upload.read()
            result = {"index": index, "filename": upload.filename}
            # An image that breaks the server: only a request of its own tells the client which one it is.
            if data == b"boom":
                return JSONResponse({"error": "internal server error", "code": "internal"}, 500)
            try:
                probabilities = self.predictor.predict(decode_image(data, (32, 32))[None])[0]
            except ImageDecodeError as exc:
                result["error"] = {"code": exc.reason, "message": str(exc)}
            else:
                order = np.argsort(-probabilities, kind="stable")
                top_k = int(request.query_params["top_k"])
                result["predictions"] = [
                    {
                        "label": COLOR_CLASSES[i],
                        "index": int(i),
                        "probability": float(probabilities[i]),
                    }
                    for i in order[:top_k]
                ]
            results.append(result)
        return JSONResponse({"model": "color", "version": "1", "results": results})


def test_busy_service_is_retried_after_503_then_every_image_is_scored(package, tmp_path):
    stand_in = StandIn(package, busy=2)
    source = write_folder(tmp_path / "in", color_files())
    output = tmp_path / "s.parquet"
    with serve(stand_in.app()) as url:
        rc = run_cli(
            "--url",
            url,
            "--input",
            source,
            "--output",
            output,
            "--batch-size",
            4,
            "--workers",
            1,
            "--top-k",
            2,
        )
    assert rc == 0
    assert stand_in.requests == [4, 4, 4, 2]  # two 503s, then the two batches
    rows = read_output(output)
    assert [r["id"] for r in rows] == sorted(color_files())
    assert all(r["label_1"] == Path(r["id"]).name.split("-")[0] and r["label_2"] for r in rows)


def test_retry_after_is_honoured(package, tmp_path):
    stand_in = StandIn(package, busy=1, retry_after="0.6")
    with serve(stand_in.app()) as url:
        settings = url_settings(url)
        started = time.perf_counter()
        with RemoteEngine(settings, RetryPolicy(base_delay_s=0.01)) as engine:
            [[row]] = list(engine.score([Record("a.png", data=color_png("blue"))]))
    assert time.perf_counter() - started >= 0.6  # the backoff alone would have waited 0.01 s
    assert row.labels == ("blue",) and row.error is None and stand_in.requests == [1, 1]


def test_whole_request_refusals_are_split_until_one_image_is_to_blame(package, tmp_path):
    stand_in = StandIn(package, max_images=2)
    files = {**color_files(), "zz-boom.png": b"boom", "zz-empty.png": b""}
    source = write_folder(tmp_path / "in", files)
    output = tmp_path / "s.csv"
    with serve(stand_in.app()) as url:
        rc = run_cli("--url", url, "--input", source, "--output", output, "--batch-size", 8, "--workers", 2)
    assert rc == 1
    rows = {r["id"]: r for r in read_output(output)}
    assert list(rows) == sorted(files)
    assert (rows["zz-boom.png"]["error"], rows["zz-empty.png"]["error"]) == ("internal", "empty")
    assert all(rows[name]["label_1"] == name.split("/")[-1].split("-")[0] for name in color_files())
    assert max(stand_in.requests) == 8 and all(n <= 2 for n in stand_in.requests[-3:])


def test_an_unreachable_service_stops_the_job_after_the_retries(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = url_settings(f"http://127.0.0.1:{port}")
    engine = RemoteEngine(settings, RetryPolicy(attempts=3, base_delay_s=0.01))
    with engine, pytest.raises(RemoteError, match="failed 3 times, last with ConnectError"):
        list(engine.score([Record("a.png", data=color_png("red"))]))


KEY = "batch-test-key"


@contextmanager
def keyed_service(package: Path) -> Iterator[str]:
    """The service's routes in this process behind its API-key middleware, which wants KEY."""
    from service import app as service_app
    from service.auth import AccessControl, hash_key
    from service.classifier import Classifier
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=str(package), device="cpu", max_batch_images=8)
    classifier = Classifier(settings)
    app = service_app.create_app()
    service_app.attach(app, classifier)
    access = AccessControl(api_keys=(bytes.fromhex(hash_key(KEY).removeprefix("sha256:")),))
    keyed = service_app.with_middlewares(app, service_app.asgi_middlewares(settings, access))
    with serve(keyed, on_start=classifier.start, on_stop=classifier.stop) as url:
        yield url


def test_the_api_key_comes_from_the_environment_and_a_refused_key_stops_the_job(package, tmp_path, monkeypatch):
    source = write_folder(tmp_path / "in", color_files())
    output = tmp_path / "s.parquet"
    with keyed_service(package) as url:
        for key, hint in [(None, "set VISIONSERVE_API_KEY"), ("wrong", "VISIONSERVE_API_KEY is not one")]:
            if key is None:
                monkeypatch.delenv("VISIONSERVE_API_KEY", raising=False)
            else:
                monkeypatch.setenv("VISIONSERVE_API_KEY", key)
            with RemoteEngine(url_settings(url)) as engine, pytest.raises(RemoteError) as refused:
                list(engine.score([Record("a.png", data=color_png("red"))]))
            assert "refused the job with HTTP 401 unauthorized" in str(refused.value) and hint in str(refused.value)
        monkeypatch.setenv("VISIONSERVE_API_KEY", KEY)
        assert run_cli("--url", url, "--input", source, "--output", output, "--top-k", 1) == 0
    rows = read_output(output)
    assert [r["label_1"] for r in rows] == [Path(r["id"]).name.split("-")[0] for r in rows]


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("/nowhere", (), "HTTP 404 not_found: no route for GET /nowhere/metadata"),
        ("", ("--top-k", 5), "HTTP 400 invalid_top_k"),  # the colour model has 3 classes
    ],
)
def test_a_refusal_of_the_whole_job_stops_it_at_the_first_request(package, tmp_path, capsys, path, options, message):
    # Before, each image was sent alone in the end and became an error row: two requests an image for nothing.
    source = write_folder(tmp_path / "in", color_files())
    with keyed_service(package) as url, pytest.MonkeyPatch.context() as env:
        env.setenv("VISIONSERVE_API_KEY", KEY)
        assert run_cli("--url", url + path, "--input", source, "--output", tmp_path / "s.parquet", *options) == 2
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("visionserve-batch: error: ") and message in line


def test_model_names_the_served_model_when_the_service_serves_several(tmp_path, capsys):
    import httpx

    from service import app as service_app
    from service.repository import ModelRepository
    from service.repository_layout import open_source, plan
    from service.settings import ServiceSettings

    root = tmp_path / "repository"
    for name in ("first", "second"):
        make_color_package(root / name / "1", name=name)
    settings = ServiceSettings(repository=str(root), device="cpu", max_batch_images=8)
    source = open_source(settings)
    repository = ModelRepository.from_plan(settings, source, plan(source, settings))
    app = service_app.create_app()
    service_app.attach(app, repository)
    images = write_folder(tmp_path / "in", color_files())
    with serve(app, on_start=repository.start, on_stop=repository.stop) as url:
        assert run_cli("--url", url, "--input", images, "--output", tmp_path / "a.parquet") == 2
        assert capsys.readouterr().err.strip().endswith("serves 2 models (first, second): name one with --model")
        output = tmp_path / "b.parquet"
        assert run_cli("--url", url, "--model", "second", "--input", images, "--output", output, "--top-k", 1) == 0
        counts = {
            name: httpx.get(f"{url}/v2/models/{name}/stats").json()["model_stats"][0]["inference_count"]
            for name in ("first", "second")
        }
    assert counts == {"first": 0, "second": len(color_files())}
    rows = read_output(output)
    assert [r["label_1"] for r in rows] == [Path(r["id"]).name.split("-")[0] for r in rows]


def test_a_job_pins_one_model_version_from_start_to_end(tmp_path):
    import httpx

    from service import app as service_app
    from service.repository import ModelRepository
    from service.repository_layout import open_source, plan
    from service.settings import ServiceSettings

    root = tmp_path / "repository"
    for version in ("1", "2"):
        make_color_package(root / "color" / version, version=version)
    (root / "repository.json").write_text(json.dumps({"models": {"color": {"versions": ["1", "2"]}}}))
    settings = ServiceSettings(repository=str(root), device="cpu", max_batch_images=8)
    source = open_source(settings)
    repository = ModelRepository.from_plan(settings, source, plan(source, settings))
    app = service_app.create_app()
    service_app.attach(app, repository)
    with serve(app, on_start=repository.start, on_stop=repository.stop) as url:
        assert served_model(url, None) == ServedModel("color", "2")  # the default version when the job starts
        pinned = dataclasses.replace(url_settings(url), served=ServedModel("color", "1"))
        with RemoteEngine(pinned) as engine:
            [rows] = list(engine.score([Record("a.png", data=color_png("blue"))]))
        counts = {
            version: httpx.get(f"{url}/v2/models/color/versions/{version}/stats").json()["model_stats"][0][
                "inference_count"
            ]
            for version in ("1", "2")
        }
        gone = dataclasses.replace(url_settings(url), served=ServedModel("color", "9"))
        with RemoteEngine(gone) as engine, pytest.raises(JobRefused, match="no longer served"):
            list(engine.score([Record("a.png", data=color_png("blue"))]))
    assert rows[0].labels == ("blue",) and counts == {"1": 1, "2": 0}


def test_the_served_model_is_asked_for_once_and_a_service_that_cannot_say_stops_the_job(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EngineError, match="cannot be reached: ConnectError"):
        served_model(f"http://127.0.0.1:{port}/classify_batch", None)
    not_ours = Starlette(routes=[Route("/metadata", lambda request: JSONResponse({"status": "ok"}))])
    with serve(not_ours) as url, pytest.raises(EngineError, match="is not a visionserve service's /metadata"):
        served_model(url, None)


def score_remote_and_local(url: str, package: Path, tmp_path: Path) -> None:
    """Score good and bad files through `url` and with the local engine: the rows must agree."""
    files = {**color_files(LABELS * 3), **{name: data for name, (data, _) in BAD_FILES.items()}}
    source = write_folder(tmp_path / "in", files)
    remote_out, local_out = tmp_path / "remote.parquet", tmp_path / "local.parquet"
    # 16 images per request, over the test services' limit of 8: split and retried, as a request should be.
    assert (
        run_cli(
            "--url",
            url,
            "--input",
            source,
            "--output",
            remote_out,
            "--batch-size",
            16,
            "--top-k",
            3,
        )
        == 1
    )
    assert (
        run_cli(
            "--model",
            package,
            "--input",
            source,
            "--output",
            local_out,
            "--top-k",
            3,
            "--workers",
            0,
        )
        == 1
    )
    remote, local = read_output(remote_out), read_output(local_out)
    assert [r["id"] for r in remote] == [r["id"] for r in local] == sorted(files)
    top = (1, 2, 3)
    for served, offline in zip(remote, local, strict=True):
        assert [served[f"label_{i}"] for i in top] == [offline[f"label_{i}"] for i in top]
        if offline["error"] is None:
            assert served["error"] is None
            served_p = [served[f"probability_{i}"] for i in top]
            np.testing.assert_allclose(served_p, [offline[f"probability_{i}"] for i in top], rtol=1e-4)
        else:  # the service names the same failures with its own codes
            assert served["error"] is not None and served["error_message"]


def test_url_mode_against_the_service_routes_in_process_matches_local_scoring(package, tmp_path):
    from service import app as service_app
    from service.classifier import Classifier
    from service.settings import ServiceSettings

    classifier = Classifier(ServiceSettings(model=str(package), device="cpu", max_batch_images=8))
    app = service_app.create_app()
    service_app.attach(app, classifier)
    with serve(app, on_start=classifier.start, on_stop=classifier.stop) as url:
        score_remote_and_local(url, package, tmp_path)


@pytest.mark.slow
def test_url_mode_against_the_running_bentoml_service_matches_local_scoring(color_service, tmp_path):
    score_remote_and_local(color_service.url, color_service.package, tmp_path)
