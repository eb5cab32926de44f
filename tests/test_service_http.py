"""Tests of the HTTP service: request parsing as pure functions, then the service's app in this process (every
refusal, content type and limit), then the real server (bentoml serve) for what only it shows."""

from __future__ import annotations

import ast
import asyncio
import base64
import gzip
import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import time
import tracemalloc
import zlib

import httpx
import pytest
from PIL import Image

from inference.imaging import encode_png
from inference.runtime import cpu_threads
from service.classify_routes import ModelChoice, parse_json_image
from service.errors import ERRORS, ApiError
from service.request_reading import decode_base64, inflate
from tests.support.color_package import COLOR_CLASSES, color_pixels, cuda_session_works, make_color_package
from tests.support.in_process import in_process_service
from tests.support.servers import (
    REPO,
    SERVICE_TEST_SETTINGS,
    make_slow_color_package,
    serve_exit,
    start_server,
    stop_server,
)

# --- parsing, without a server ----------------------------------------------------------------------------------


def test_json_body_gives_image_bytes_the_model_choice_and_top_k():
    data, choice, top_k = parse_json_image(
        json.dumps({"image": base64.b64encode(b"abc").decode(), "top_k": 2}).encode()
    )
    assert (data, choice, top_k) == (b"abc", ModelChoice(), 2)
    body = {"image": base64.b64encode(b"abc").decode(), "model": "color", "version": "2"}
    assert parse_json_image(json.dumps(body).encode())[1] == ModelChoice("color", "2")


def test_base64_accepts_a_data_url_prefix():
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"png bytes").decode()) == b"png bytes"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"image": "aGk=", "colour": 1}', "invalid_json"),
        (b'{"url": "http://169.254.169.254/"}', "url_not_supported"),
        (b'{"top_k": 1}', "missing_image"),
        (b'{"image": 12}', "missing_image"),
        (b'{"image": "aGk=", "model": 3}', "invalid_model_choice"),
        (b'{"image": "aGk=", "version": ""}', "invalid_model_choice"),
        (b'{"image": "abcde"}', "invalid_base64"),  # length not a multiple of 4
        (b'{"image": "ab!?"}', "invalid_base64"),  # not in the alphabet
        ('{"image": "\u00e9abc"}'.encode(), "invalid_base64"),  # not ASCII
        (b"[" * 100_000, "invalid_json"),  # nested too deep for the parser
    ],
)
def test_bad_json_bodies_are_400(body, code):
    with pytest.raises(ApiError) as refused:
        parse_json_image(body)
    assert (refused.value.status, refused.value.code) == (400, code)


# --- the error vocabulary and the module layout ------------------------------------------------------------------

SERVICE_DIR = REPO / "service"


def test_every_error_code_is_in_the_table_and_in_docs_errors_md():
    documented = {}
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            documented[cells[0].strip("`")] = cells[1]
    table = {code: str(entry.status) if entry.status else "Starlette's" for code, entry in ERRORS.items()}
    assert documented == table
    # Every code the service raises by name is in the table (ApiError would raise KeyError at run time).
    raised = set()
    for path in SERVICE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            # ApiError(code, message, ...) and oip's bad_request(message, code)
            position = {"ApiError": 0, "bad_request": 1}.get(getattr(getattr(node, "func", None), "id", None))
            if isinstance(node, ast.Call) and position is not None and len(node.args) > position:
                code = node.args[position]
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    raised.add(code.value)
    assert raised and raised <= set(ERRORS)
    # The decoder's reasons (shared with batch scoring) are service codes as they are.
    reasons = set()
    for node in ast.walk(ast.parse((REPO / "inference" / "imaging.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ImageDecodeError" and node.args:
            reasons.add(node.args[0].value)
    assert reasons == {"empty", "corrupt", "unsupported_format", "image_too_large"} and reasons <= set(ERRORS)


# --- requests and answers, in this process and over the network -------------------------------------------------------


def png(label: str) -> bytes:
    return encode_png(color_pixels(label)[0])


def encoded(format_: str, mode: str, colour, size=(40, 30), **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=format_, **save)
    return buffer.getvalue()


def labels(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["label"] for p in response.json()["predictions"]]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["code"] == code and body["error"]


# --- the service's app in this process: every refusal, content type and limit -----------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    """The service's Starlette app (create_app + attach) over a Classifier of the colour package, with the settings
    of the `color_service` server (SERVICE_TEST_SETTINGS), in this process."""
    with in_process_service(make_color_package(tmp_path_factory.mktemp("in-process") / "color")) as client:
        yield client


@pytest.mark.parametrize(
    ("image", "label"),
    [
        (encoded("PNG", "RGBA", (255, 0, 0, 255)), "red"),  # RGBA, opaque: its own colour
        (encoded("PNG", "RGBA", (0, 0, 255, 0)), None),  # fully transparent: composited onto white
        (encoded("PNG", "L", 128), None),  # grayscale -> three equal channels
        (encoded("JPEG", "CMYK", (0, 255, 255, 0)), "red"),  # CMYK red
        (encoded("PNG", "I;16", 65535), None),  # 16-bit grayscale
        (encoded("PNG", "RGB", (0, 0, 255), size=(500, 7)), "blue"),  # any size: resized to 32x32
    ],
)
def test_image_modes_and_sizes_are_converted_by_one_policy(app_client, image, label):
    response = app_client.post("/classify?top_k=1", files={"image": ("x.png", image)})
    assert response.status_code == 200, response.text
    if label is not None:
        assert labels(response) == [label]


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status", "code"),
    [
        ("/classify", b"", "image/png", 400, "empty"),
        ("/classify", b"plain text, not pixels", "image/png", 415, "unsupported_format"),
        ("/classify", None, "image/png", 400, "corrupt"),  # a truncated PNG
        ("/classify", encoded("GIF", "L", 0), "image/png", 415, "unsupported_format"),
        ("/classify", encoded("PNG", "L", 0, size=(1001, 1000)), "image/png", 413, "image_too_large"),
        ("/classify", b"\x80\x04K\x01.", "application/python-pickle", 415, "pickle_refused"),
        ("/classify", b"abc", "text/plain", 415, "unsupported_media_type"),
        ("/classify", b"{oops", "application/json", 400, "invalid_json"),
        ("/classify", b'{"image": "abc"}', "application/json", 400, "invalid_base64"),
        ("/classify", b'{"image": "a@c="}', "application/json", 400, "invalid_base64"),
        (
            "/classify",
            b'{"url": "http://127.0.0.1/x.png"}',
            "application/json",
            400,
            "url_not_supported",
        ),
        ("/classify?top_k=0", None, "image/png", 400, "invalid_top_k"),
        ("/classify?top_k=4", None, "image/png", 400, "invalid_top_k"),
        ("/classify?top_k=two", None, "image/png", 400, "invalid_top_k"),
        ("/classify_batch", b"abc", "image/png", 415, "unsupported_media_type"),
    ],
)
def test_bad_requests_get_json_errors_never_500(app_client, path, content, content_type, status, code):
    if content is None:
        content = png("red")[:60]
    assert_error(app_client.post(path, content=content, headers={"content-type": content_type}), status, code)


def test_a_wrong_method_gets_a_json_error(app_client):
    wrong_method = app_client.get("/classify")
    assert_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["allow"] == "POST"
    assert_error(app_client.get("/v2/models/color/infer"), 405, "method_not_allowed")


def test_multipart_problems_are_400(app_client):
    assert_error(app_client.post("/classify", files={"picture": ("r.png", png("red"))}), 400, "missing_image")
    assert_error(app_client.post("/classify_batch", files={"other": ("r.png", png("red"))}), 400, "no_images")
    too_many = [("images", (f"{i}.png", png("red"))) for i in range(9)]  # the test server allows 8
    assert_error(app_client.post("/classify_batch", files=too_many), 400, "too_many_images")
    broken = b"--xyz\r\nContent-Disposition: form-data; name=image\r\n\r\nabc"  # no final boundary
    response = app_client.post(
        "/classify", content=broken, headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        ({"content-length": "1000000000"}, 413, "body_too_large"),  # Content-Length says 1 GB
        ({"content-encoding": "zstd"}, 415, "unsupported_content_encoding"),
    ],
)
def test_a_refusal_from_the_headers_reads_none_of_the_body(app_client, header, status, code):
    # The body records any read of it, so an answer with no read proves it was not awaited.
    read = []

    async def body():
        read.append(True)
        yield b"\0"

    response = app_client.post("/classify", content=body(), headers={"content-type": "image/png", **header})
    assert_error(response, status, code)
    assert read == []


def test_a_chunked_body_over_the_limit_is_413_once_it_passes_the_limit(app_client):
    sent = []

    async def endless():  # the body never ends (no terminating chunk)
        while True:
            sent.append(100_000)
            yield b"\0" * 100_000

    response = app_client.post("/classify", content=endless(), headers={"content-type": "image/png"})
    assert response.request.headers["transfer-encoding"] == "chunked"
    status, received = response.status_code, response.content
    assert status == 413 and b"body_too_large" in received
    assert len(sent) == 6  # 6 x 100 kB passes the 500 kB limit: not one chunk more is read


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("GZIP", gzip.compress)],
)
def test_a_compressed_body_answers_as_the_plain_one_on_every_body_route(app_client, coding, compress):
    image = png("red")
    plain = app_client.post("/classify", files={"image": ("r.png", image)})
    assert plain.status_code == 200, plain.text
    multipart = httpx.Request("POST", "http://x/classify", files={"image": ("r.png", image)})
    multipart.read()
    requests = [
        ("/classify", compress(multipart.content), multipart.headers["content-type"]),
        ("/classify", compress(image), "image/png"),
        ("/classify", compress(json.dumps({"image": base64.b64encode(image).decode()}).encode()), "application/json"),
    ]
    for path, body, content_type in requests:
        response = app_client.post(
            path, content=body, headers={"content-type": content_type, "content-encoding": coding}
        )
        assert response.status_code == 200, response.text
        assert response.json() == plain.json()
    v2 = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
    response = app_client.post(
        "/v2/models/color/infer",
        content=compress(json.dumps(v2).encode()),
        headers={"content-type": "application/json", "content-encoding": coding},
    )
    assert response.status_code == 200, response.text
    assert response.json() == app_client.post("/v2/models/color/infer", json=v2).json()


def test_a_body_that_decodes_past_the_limit_is_413_before_it_is_all_decoded():
    # A gzip bomb: 64 MiB of zeros in about 64 kB. The limit here is 1 MiB; decoding stops one chunk past it.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(64)) + compressor.flush()
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as refused:
            inflate(bomb, "gzip", 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code == "body_too_large" and "decodes (gzip)" in refused.value.message
    assert peak < 8 << 20  # two chunks and their join, not the 64 MiB


def test_a_compressed_body_over_the_limit_gets_413_over_http(app_client):
    bomb = gzip.compress(bytes(600_000))  # the test server's limit is 500 kB
    response = app_client.post(
        "/classify", content=bomb, headers={"content-type": "image/png", "content-encoding": "gzip"}
    )
    assert_error(response, 413, "body_too_large")


@pytest.mark.parametrize(
    ("coding", "body", "status", "code"),
    [
        ("br", b"anything", 415, "unsupported_content_encoding"),
        ("gzip, gzip", gzip.compress(gzip.compress(b"x")), 415, "unsupported_content_encoding"),
        ("gzip", gzip.compress(b"abc" * 1000)[:-20], 400, "invalid_content_encoding"),  # truncated
        ("gzip", b"not compressed at all", 400, "invalid_content_encoding"),
        ("gzip", gzip.compress(b"abc") + b"trailing bytes", 400, "invalid_content_encoding"),
        ("deflate", b"", 400, "invalid_content_encoding"),
    ],
)
def test_a_body_with_an_unknown_or_broken_coding_gets_a_json_error(app_client, coding, body, status, code):
    response = app_client.post(
        "/classify", content=body, headers={"content-type": "image/png", "content-encoding": coding}
    )
    assert_error(response, status, code)


# --- the real server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(color_service):
    with httpx.Client(base_url=color_service.url, timeout=30) as client:
        yield client


@pytest.mark.e2e
def test_health_and_readiness(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200


@pytest.mark.e2e
def test_a_path_that_no_route_has_gets_bentomls_404(client):
    # A path that no route has never reaches the service's app: BentoML's own server answers it, in plain text.
    assert client.get("/no-such-route").status_code == 404


@pytest.mark.e2e
def test_classify_multipart(client):
    response = client.post("/classify", files={"image": ("red.png", png("red"), "image/png")})
    body = response.json()
    assert (body["model"], body["version"]) == ("color", "1")
    assert labels(response) == ["red", "green", "blue"]  # default top_k 5, capped at the 3 classes
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1, abs=1e-5)
    assert body["predictions"][0]["index"] == 0


@pytest.mark.e2e
def test_classify_raw_body_with_query_top_k(client):
    response = client.post("/classify?top_k=1", content=png("blue"), headers={"content-type": "image/png"})
    assert labels(response) == ["blue"]
    jpeg = encoded("JPEG", "RGB", (0, 255, 0))
    assert labels(client.post("/classify?top_k=1", content=jpeg, headers={"content-type": "image/jpeg"})) == ["green"]
    webp = encoded("WEBP", "RGB", (255, 0, 0), lossless=True)
    assert labels(client.post("/classify?top_k=1", content=webp, headers={"content-type": "image/webp"})) == ["red"]


@pytest.mark.e2e
def test_classify_json_base64_and_form_top_k(client):
    image = base64.b64encode(png("green")).decode()
    assert labels(client.post("/classify", json={"image": image, "top_k": 2}))[:1] == ["green"]
    assert len(labels(client.post("/classify", json={"image": image, "top_k": 2}))) == 2
    form = client.post("/classify", files={"image": ("g.png", png("green"))}, data={"top_k": "1"})
    assert labels(form) == ["green"]


@pytest.mark.e2e
def test_classify_batch_keeps_order_and_isolates_bad_images(client):
    files = [
        ("images", ("a.png", png("blue"))),
        ("images", ("b.png", b"not an image at all")),
        ("images", ("c.png", png("red"))),
        ("images", ("d.png", b"")),
        ("images", ("e.png", png("green")[:70])),
    ]
    response = client.post("/classify_batch?top_k=1", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("color", "1")
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["filename"] for r in results] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert results[0]["predictions"][0]["label"] == "blue" and len(results[0]["predictions"]) == 1
    assert results[2]["predictions"][0]["label"] == "red"
    assert [results[i]["error"]["code"] for i in (1, 3, 4)] == [
        "unsupported_format",
        "empty",
        "corrupt",
    ]
    assert all("predictions" not in results[i] for i in (1, 3, 4))


@pytest.fixture(scope="module")
def two_instance_service(tmp_path_factory):
    """The colour package served with two model calls side by side (VISIONSERVE_MODEL_INSTANCES=2)."""
    work_dir = tmp_path_factory.mktemp("two-instances")
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_MODEL_INSTANCES": "2"}
    server = start_server(make_color_package(work_dir / "color"), work_dir, settings)
    yield server
    stop_server(server)


@pytest.mark.e2e
@pytest.mark.parametrize("service", ["color_service", "two_instance_service"])
def test_concurrent_requests_never_get_each_others_results(service, request):
    url = request.getfixturevalue(service).url
    expected = [COLOR_CLASSES[i % 3] for i in range(60)]

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            singles = [
                client.post("/classify?top_k=1", content=png(label), headers={"content-type": "image/png"})
                for label in expected
            ]
            batches = [
                client.post(
                    "/classify_batch?top_k=1",
                    files=[("images", (f"{j}.png", png(COLOR_CLASSES[(i + j) % 3]))) for j in range(5)],
                )
                for i in range(6)
            ]
            return await asyncio.gather(*singles), await_results(await asyncio.gather(*batches))

    def await_results(responses):
        return [[r["predictions"][0]["label"] for r in response.json()["results"]] for response in responses]

    singles, batches = asyncio.run(send_all())
    assert [labels(r)[0] for r in singles] == expected
    assert batches == [[COLOR_CLASSES[(i + j) % 3] for j in range(5)] for i in range(6)]


@pytest.mark.e2e
def test_two_model_instances_share_the_runtime_threads(two_instance_service):
    metadata = httpx.get(two_instance_service.url + "/metadata").json()
    assert metadata["batching"]["model_instances"] == 2
    assert metadata["intra_op_threads"] == max(1, cpu_threads() // 2)


@pytest.mark.e2e
def test_open_inference_protocol_routes_are_mounted(client):
    pytest.importorskip("service.oip")
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/color").json()["name"] == "color"
    pixels = color_pixels("blue", batch=2)
    request = {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(pixels.shape),
                "datatype": "UINT8",
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    response = client.post("/v2/models/color/infer", json=request)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["datatype"] == "FP32" and output["shape"] == [2, 3]
    assert output["data"][2] > 0.99 and output["data"][5] > 0.99  # both rows: blue


@pytest.mark.e2e
def test_metadata_reports_the_runtime_and_the_cpu_fallback(client):
    metadata = client.get("/metadata").json()
    assert metadata["name"] == "color" and metadata["classes"] == list(COLOR_CLASSES)
    assert (metadata["input"]["height"], metadata["input"]["width"]) == (32, 32)
    assert len(metadata["sha256"]) == 64 and metadata["backend"] == "onnx"
    if metadata["device"] == "cuda":
        pytest.skip("a GPU is present: no fallback to observe")
    assert metadata["execution_provider"] == "CPUExecutionProvider"
    assert metadata["requested_device"] == "auto" and "CUDAExecutionProvider" in metadata["fallback_reason"]


@pytest.mark.e2e
def test_metrics_show_batching_runtime_and_rejections(client):
    client.post("/classify", content=png("red"), headers={"content-type": "image/png"})
    client.post("/classify", content=b"", headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    for series in (
        "visionserve_queue_wait_seconds_bucket",
        "visionserve_batch_size_bucket",
        "visionserve_inference_seconds_bucket",
        'visionserve_rejected_requests_total{reason="empty"}',
        "visionserve_runtime_info{",
        "bentoml_service_request_duration_seconds",  # BentoML's own series are still there
    ):
        assert series in text, series
    assert 'provider="CPUExecutionProvider"' in text or 'provider="CUDAExecutionProvider"' in text


# --- a slow model: warm-up and overload, seen from outside ----------------------------------------------------------


@pytest.fixture(scope="module")
def slow_service(tmp_path_factory):
    """One model call takes about two seconds here; one image per batch; one image may wait."""
    work_dir = tmp_path_factory.mktemp("slow-service")
    package = make_slow_color_package(work_dir / "slow")
    settings = {
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_THREADS": "1",  # one core: about as slow on a big machine as on a small one
        "VISIONSERVE_MAX_BATCH_SIZE": "1",
        "VISIONSERVE_MAX_QUEUE": "1",
        "VISIONSERVE_MAX_BATCH_IMAGES": "1",
        "VISIONSERVE_REQUEST_TIMEOUT_S": "60",
    }
    server = start_server(package, work_dir, settings, wait_ready=False)
    yield server
    stop_server(server)


@pytest.mark.e2e
@pytest.mark.slow
def test_ready_only_after_warm_up_requests_meanwhile_wait_then_overload_is_refused_fast_and_recovers(slow_service):
    url = slow_service.url
    # Alive at once, but not ready while the warm-up batches run (about two seconds each).
    assert httpx.get(url + "/livez").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 503
    # A request that arrives meanwhile (as after a crashed worker's restart) waits for the warm-up and is served.
    early = httpx.post(url + "/classify", content=png("red"), headers={"content-type": "image/png"}, timeout=60)
    assert labels(early)[0] == "red"
    assert httpx.get(url + "/readyz").status_code == 200

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one(label):
                started = time.monotonic()
                response = await client.post(
                    "/classify?top_k=1", content=png(label), headers={"content-type": "image/png"}
                )
                return response, time.monotonic() - started

            return await asyncio.gather(*(one(COLOR_CLASSES[i % 3]) for i in range(8)))

    outcomes = asyncio.run(burst())
    refused = [(r, seconds) for r, seconds in outcomes if r.status_code == 503]
    answered = [(r, i, seconds) for i, (r, seconds) in enumerate(outcomes) if r.status_code == 200]
    # One running, one waiting at most: the rest are turned away.
    assert len(refused) >= 5 and answered
    assert len(refused) + len(answered) == 8
    for response, _ in refused:
        assert_error(response, 503, "queue_full")
        assert int(response.headers["retry-after"]) >= 1
    for response, i, _ in answered:
        assert labels(response) == [COLOR_CLASSES[i % 3]]
    # Refused at once: every refusal came back before the first answer (a model call of about two seconds).
    assert max(seconds for _, seconds in refused) < min(seconds for *_, seconds in answered)
    # After the burst the service answers normally.
    after = httpx.post(
        url + "/classify?top_k=1",
        content=png("blue"),
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert labels(after) == ["blue"]


# --- several workers ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_workers_each_serve_with_their_share_of_the_threads(tmp_path):
    package = make_color_package(tmp_path / "package")
    settings = {"VISIONSERVE_DEVICE": "cpu", "VISIONSERVE_WORKERS": "2", "VISIONSERVE_THREADS": "1"}
    server = start_server(package, tmp_path, settings)
    try:
        worker_pids = subprocess.run(
            ["pgrep", "-f", "_bentoml_impl.worker", "-P", str(server.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(worker_pids) == 2
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for label in COLOR_CLASSES * 4:
                response = client.post("/classify?top_k=1", content=png(label), headers={"content-type": "image/png"})
                assert labels(response) == [label]
            assert client.get("/metadata").json()["intra_op_threads"] == 1
    finally:
        stop_server(server)


# --- a body sent too slowly ----------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_a_body_sent_too_slowly_gets_408_at_the_request_deadline_and_the_connection_is_closed(tmp_path):
    # A client that declares a body and sends it a few bytes at a time (slowloris) holds its connection and its
    # share of the upload budget only until the request's deadline (VISIONSERVE_REQUEST_TIMEOUT_S from arrival),
    # then gets the service's JSON 408 and the connection is closed (it might still be sending).
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_REQUEST_TIMEOUT_S": "1"}
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        with socket.create_connection(("127.0.0.1", server.server.port), timeout=30) as connection:
            head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
            connection.sendall(head)
            started = time.monotonic()
            # Ten bytes every half second, until the server answers.
            while not select.select([connection], [], [], 0.5)[0] and time.monotonic() - started < 20:
                connection.sendall(b"\0" * 10)
            waited = time.monotonic() - started
            response = http.client.HTTPResponse(connection)
            response.begin()
            status, headers, body = response.status, response.headers, response.read()
            try:
                closed = connection.recv(1) == b""
            except ConnectionResetError:  # closed while the last bytes sent were on their way
                closed = True
    finally:
        stop_server(server)
    assert status == 408 and 1 <= waited < 3, (status, waited)
    assert json.loads(body)["code"] == "body_timeout"
    assert headers["connection"] == "close" and closed


# --- BentoML's configuration overrides the service's defaults ------------------------------------------------------


@pytest.mark.e2e
def test_the_access_log_can_be_turned_on_and_prediction_routes_stay_untraced(tmp_path):
    # The service's defaults (service/bentoml_config.py, checked in tests/test_bentoml_config.py): no access log,
    # no spans for the prediction routes. A user's BentoML configuration turns the log back on.
    package = make_color_package(tmp_path / "package")
    settings = {
        "VISIONSERVE_DEVICE": "cpu",
        "BENTOML_CONFIG_OPTIONS": "services.visionserve.logging.access.enabled=true",
    }
    server = start_server(package, tmp_path, settings)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert labels(client.post("/classify", content=png("red"), headers={"content-type": "image/png"}))
            assert client.get("/metadata").status_code == 200
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 20  # the worker's output reaches the log through `bentoml serve`
        while len(lines) < 2 and time.monotonic() < deadline:
            log = server.server.log_path.read_text(errors="replace").splitlines()
            lines = {path: line for line in log for path in ("/classify", "/metadata") if f"path={path}," in line}
            time.sleep(0.2)
    finally:
        stop_server(server)
    assert lines.keys() == {"/classify", "/metadata"}, "no access-log lines"
    assert "status=200" in lines["/classify"] and "trace=" not in lines["/classify"]
    assert "trace=" in lines["/metadata"]


# --- a configuration that cannot serve stops `bentoml serve` at once -------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "problem, settings, message",
    [
        ("missing", {}, "does not exist"),
        ("tampered", {}, "fails its checksum"),
        ("no int8 file", {"VISIONSERVE_BACKEND": "onnx-int8"}, "has no onnx-int8 model"),
        ("bad setting", {"VISIONSERVE_MAX_QUEUE": "many"}, "VISIONSERVE_MAX_QUEUE='many' is not a valid int"),
        ("cuda without a GPU", {"VISIONSERVE_DEVICE": "cuda"}, "device=cuda was requested but"),
    ],
)
def test_serve_exits_with_one_line_when_it_cannot_serve(tmp_path, problem, settings, message):
    # Before, a bad package (or device=cuda without a GPU) failed each worker's __init__ and BentoML restarted
    # the worker forever.
    if problem == "cuda without a GPU" and cuda_session_works():
        pytest.skip("a GPU is present")
    package = make_color_package(tmp_path / "package")
    if problem == "missing":
        package = tmp_path / "no-such-package"
    if problem == "tampered":
        model = package / "model.onnx"
        model.write_bytes(model.read_bytes() + b"\0")
    code, output = serve_exit(package, settings, tmp_path)
    assert code == 1
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith("visionserve: cannot serve: ") and message in last_line
    assert "Traceback" not in output


def test_errors_answered_in_plain_text_inside_the_app_reach_the_client_as_json():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from service.app import JsonErrors

    async def plain(request):
        return PlainTextResponse("Method Not Allowed", status_code=405, headers={"Allow": "GET"})

    async def fine(request):
        return PlainTextResponse("# HELP metrics")

    client = TestClient(JsonErrors(Starlette(routes=[Route("/plain", plain), Route("/fine", fine)])))
    refused = client.get("/plain")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET"
    assert refused.json() == {"error": "Method Not Allowed", "code": "method_not_allowed"}
    assert client.get("/fine").text == "# HELP metrics"  # successes pass untouched


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
def test_bentomls_own_routes_answer_a_wrong_method_in_json(client, method):
    for path in ("/livez", "/readyz", "/metrics"):
        response = client.request(method, path)
        assert_error(response, 405, "method_not_allowed")


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_with_the_queue_full_answers_every_admitted_request_and_exits_within_the_deadline(tmp_path):
    """Drain: nothing admitted is dropped without an answer; the longest it takes is the request timeout, which the
    deployments' grace period (30 s, deploy/) exceeds."""
    timeout_s = 5
    package = make_slow_color_package(tmp_path / "slow")
    settings = {
        "VISIONSERVE_DEVICE": "cpu",
        "VISIONSERVE_THREADS": "1",
        "VISIONSERVE_MAX_BATCH_SIZE": "1",
        "VISIONSERVE_MAX_QUEUE": "4",
        "VISIONSERVE_MAX_BATCH_IMAGES": "1",
        "VISIONSERVE_REQUEST_TIMEOUT_S": str(timeout_s),
    }
    server = start_server(package, tmp_path, settings)
    try:

        async def drain():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

                async def one():
                    try:
                        response = await client.post(
                            "/classify", content=png("red"), headers={"content-type": "image/png"}
                        )
                    except httpx.TransportError as exc:
                        return type(exc).__name__
                    return f"{response.status_code} {response.json().get('code', '')}".strip()

                requests = [asyncio.create_task(one()) for _ in range(6)]
                await asyncio.sleep(0.5)  # one running, four queued, one refused (queue_full)
                signalled = time.monotonic()
                os.kill(server.process.pid, signal.SIGTERM)
                answers = await asyncio.gather(*requests)
                await asyncio.to_thread(server.process.wait, 60)
                return answers, time.monotonic() - signalled

        answers, exited_after = asyncio.run(drain())
    finally:
        stop_server(server)
    assert sorted(answers).count("503 queue_full") == 1
    admitted = [a for a in answers if a != "503 queue_full"]
    assert len(admitted) == 5 and set(admitted) <= {"200", "504 deadline_exceeded"} and "200" in admitted
    assert server.process.returncode == 0 and exited_after < timeout_s + 10
