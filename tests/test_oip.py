"""Tests of the Open Inference Protocol (KServe v2) routes: request parsing as pure functions, then the routes in a
Starlette app over the real Classifier (batcher included) serving the colour package."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from inference.imaging import encode_png
from service import app as service_app
from service.classifier import Classifier
from service.errors import ApiError
from service.oip import InputLimits, infer_response, parse_infer_request, split_body
from service.settings import ServiceSettings
from tests.support.color_package import COLOR_CLASSES, color_pixels, make_color_package

LIMITS = InputLimits(input_size=(32, 32), max_images=4, max_image_bytes=1000)


def pixels_input(pixels: np.ndarray, *, nested: bool = False, **overrides) -> dict:
    tensor = {
        "name": "pixels",
        "shape": list(pixels.shape),
        "datatype": "UINT8",
        "data": pixels.tolist() if nested else pixels.ravel().tolist(),
    }
    return {**tensor, **overrides}


def images_input(blobs: list[bytes], **overrides) -> dict:
    tensor = {
        "name": "images",
        "shape": [len(blobs)],
        "datatype": "BYTES",
        "data": [base64.b64encode(blob).decode() for blob in blobs],
    }
    return {**tensor, **overrides}


def _png() -> bytes:
    return encode_png(color_pixels("green")[0])


def body(*inputs: dict, **fields) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def parse_error(raw: bytes, limits: InputLimits = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_infer_request(raw, limits)
    return caught.value


# --- parsing: valid requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
def test_pixels_tensor_flat_or_nested_gives_the_same_array(nested):
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    parsed = parse_infer_request(body(pixels_input(pixels, nested=nested), id="req-7"), LIMITS)
    assert parsed.id == "req-7"
    assert parsed.encoded is None
    assert parsed.pixels.dtype == np.uint8
    np.testing.assert_array_equal(parsed.pixels, pixels)


def test_bytes_tensor_gives_the_encoded_images():
    blobs = [encode_png(color_pixels(label)[0]) for label in ("red", "blue")]
    parameters = {"content_type": "base64"}
    parsed = parse_infer_request(body(images_input(blobs, parameters=parameters)), LIMITS)
    assert parsed.pixels is None
    assert parsed.encoded == tuple(blobs)
    assert parsed.id is None


def test_requested_probabilities_output_is_accepted():
    raw = body(pixels_input(color_pixels("red")), outputs=[{"name": "probabilities"}])
    assert parse_infer_request(raw, LIMITS).pixels.shape == (1, 32, 32, 3)


# --- parsing: bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting past the recursion limit
        (b"{}", '"inputs"'),
        (json.dumps({"inputs": []}).encode(), '"inputs"'),
        (json.dumps({"inputs": [1]}).encode(), "JSON object"),
        (
            json.dumps({"inputs": [{"name": "pixels", "shape": [1, 32, 32, 3], "datatype": "UINT8"}]}).encode(),
            "data",
        ),
    ],
)
def test_malformed_requests_are_400(raw, words):
    error = parse_error(raw)
    assert error.status == 400
    assert words in error.message


def _red(**overrides) -> dict:
    return pixels_input(color_pixels("red"), **overrides)


@pytest.mark.parametrize(
    "tensor, words",
    [
        (_red(datatype="FP32"), "UINT8"),
        (_red(datatype="BYTES"), "UINT8"),
        (_red(shape=[1, 16, 16, 3], data=[0] * 768), "[N, 32, 32, 3]"),
        (_red(shape=[1, 32, 32, 4]), "[N, 32, 32, 3]"),
        (_red(shape=[32, 32, 3]), "[N, 32, 32, 3]"),
        (_red(shape=[1, 32, 32, "3"]), "list of integers"),
        (_red(shape=[True, 32, 32, 3]), "list of integers"),
        (_red(shape=[-1, 32, 32, 3]), ">= 0"),
        (_red(shape=[0, 32, 32, 3], data=[]), "empty"),
        (_red(shape=[5, 32, 32, 3], data=[0] * 5 * 3072), "limit of 4"),
        (_red(shape=[2, 32, 32, 3]), "6144 elements"),  # data for one image, shape says two
        (_red(data=[0] * 3071), "3072 elements"),
        (_red(data=[0.5] * 3072), "integers"),
        (_red(data=[1.0] * 3072), "integers"),
        (_red(data=["1"] * 3072), "integers"),
        (_red(data=[None] * 3072), "integers"),
        (_red(data=[256] * 3072), "0..255"),
        (_red(data=[-1] * 3072), "0..255"),
        (_red(data=[[0] * 3072]), "shape"),  # one nested row of the wrong shape
        (
            _red(data=[[[[0, 0, 0]] * 32] * 32, [[[0, 0]] * 32] * 32], shape=[2, 32, 32, 3]),
            "regular array",
        ),
        (_red(data="0" * 3072), "JSON array"),
        (_red(name="input0"), "unknown input 'input0'"),
        (_red(parameters={"binary_data_size": 3072}), "both data and binary_data_size"),
        (_red(parameters=[1]), "JSON object"),
    ],
)
def test_bad_pixels_tensors_are_400(tensor, words):
    error = parse_error(body(tensor))
    assert error.status == 400
    assert words in error.message


def test_two_inputs_are_400():
    assert "exactly one input" in parse_error(body(_red(), _red())).message


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"id": 42}, '"id" must be a string'),
        ({"outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
        ({"outputs": "probabilities"}, "list"),
        (
            {"outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
            "true or false",
        ),
        ({"parameters": {"binary_data_output": "yes"}}, "true or false"),
        ({"parameters": "binary"}, "JSON object"),
    ],
)
def test_bad_request_fields_are_400(fields, words):
    error = parse_error(body(_red(), **fields))
    assert error.status == 400
    assert words in error.message


@pytest.mark.parametrize(
    "tensor, words",
    [
        (images_input([_png()], datatype="UINT8"), "BYTES"),
        (images_input([_png()], shape=[1, 1]), "shape [N]"),
        (images_input([_png()], shape=[2]), "1 elements"),
        (images_input([], shape=[0]), "empty"),
        (images_input([_png()] * 5), "limit of 4"),
        (images_input([_png()], data=["not base64!"]), "not valid base64"),
        (images_input([_png()], data=["QUJ"]), "not valid base64"),  # missing padding
        (images_input([_png()], data=[123]), "base64 string"),
        (images_input([_png()], parameters={"content_type": "str"}), "content_type"),
    ],
)
def test_bad_bytes_tensors_are_400(tensor, words):
    error = parse_error(body(tensor))
    assert error.status == 400
    assert words in error.message


def test_oversized_base64_image_is_413_before_decoding():
    # 1,400 base64 characters encode 1,050 bytes, over the 1,000-byte limit.
    error = parse_error(body(images_input([b""], data=["A" * 1400])))
    assert error.status == 413
    assert error.code == "image_too_large"


def test_infer_response_follows_the_spec_layout():
    probabilities = np.array([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    response = infer_response("color", "1", "abc", probabilities)
    assert json.loads(response.body) == {
        "model_name": "color",
        "model_version": "1",
        "id": "abc",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [2, 3],
                "datatype": "FP32",
                "data": [0.25, 0.75, 0.0, 1.0, 0.0, 0.0],
            }
        ],
    }
    assert "id" not in json.loads(infer_response("color", "1", None, probabilities).body)


# --- the binary tensor data extension ------------------------------------------------------------------------


def binary_request(tensor: dict, data: bytes, **fields) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a request whose one input's data follows the JSON, as tritonclient sends it."""
    tensor = {**tensor, "parameters": {"binary_data_size": len(data)}}
    tensor.pop("data")
    header = body(tensor, **fields)
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def length_prefixed(blobs: list[bytes]) -> bytes:
    return b"".join(len(blob).to_bytes(4, "little") + blob for blob in blobs)


def parse_binary(raw: bytes, headers: dict[str, str]):
    header, binary = split_body(raw, headers.get("Inference-Header-Content-Length"))
    return parse_infer_request(header, LIMITS, binary)


def test_binary_pixels_and_binary_output_request():
    pixels = np.random.default_rng(2).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    raw, headers = binary_request(pixels_input(pixels), pixels.tobytes(), parameters={"binary_data_output": True})
    parsed = parse_binary(raw, headers)
    np.testing.assert_array_equal(parsed.pixels, pixels)
    assert parsed.binary_output
    # An output's own binary_data overrides the request-wide default.
    outputs = [{"name": "probabilities", "parameters": {"binary_data": False}}]
    raw, headers = binary_request(
        pixels_input(pixels),
        pixels.tobytes(),
        parameters={"binary_data_output": True},
        outputs=outputs,
    )
    assert not parse_binary(raw, headers).binary_output


def test_binary_bytes_elements():
    blobs = [encode_png(color_pixels(label)[0]) for label in ("red", "green")]
    raw, headers = binary_request(images_input(blobs), length_prefixed(blobs))
    assert parse_binary(raw, headers).encoded == tuple(blobs)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: binary_request(_red(), bytes(3071)), "3071 bytes of binary data"),
        (
            lambda: binary_request(images_input([_png()]), length_prefixed([_png()])[:-1]),
            "ends first",
        ),
        (
            lambda: binary_request(images_input([_png()]), length_prefixed([_png()]) + b"x"),
            "follow the last",
        ),
        (
            lambda: binary_request(images_input([_png(), _png()]), length_prefixed([_png()])),
            "ends before element 1",
        ),
        (
            lambda: (
                body(_red()) + b"xyz",
                {"Inference-Header-Content-Length": str(len(body(_red())))},
            ),
            "no input declares",
        ),
        (
            lambda: (body(_red()), {"Inference-Header-Content-Length": "10000000"}),
            "Inference-Header-Content-Length",
        ),
        (
            lambda: (body(_red()), {"Inference-Header-Content-Length": "-5"}),
            "Inference-Header-Content-Length",
        ),
    ],
)
def test_bad_binary_requests_are_400(make, words):
    raw, headers = make()
    with pytest.raises(ApiError) as caught:
        parse_binary(raw, headers)
    assert caught.value.status == 400
    assert words in caught.value.message


def test_binary_data_size_must_match_what_follows():
    tensor = {**_red(), "parameters": {"binary_data_size": 3072}}
    tensor.pop("data")
    header = body(tensor)
    with pytest.raises(ApiError) as caught:
        parse_infer_request(header, LIMITS, bytes(100))
    assert "binary_data_size 3072" in caught.value.message


def test_oversized_binary_element_is_413():
    raw, headers = binary_request(images_input([b"x" * 1001]), length_prefixed([b"x" * 1001]))
    with pytest.raises(ApiError) as caught:
        parse_binary(raw, headers)
    assert caught.value.status == 413
    assert caught.value.code == "image_too_large"


def test_binary_response_layout():
    probabilities = np.array([[0.25, 0.75, 0.0]], dtype=np.float32)
    response = infer_response("color", "1", None, probabilities, binary_output=True)
    length = int(response.headers["Inference-Header-Content-Length"])
    header = json.loads(response.body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 12}
    assert "data" not in header["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(response.body[length:], dtype="<f4"), probabilities.ravel())
    assert response.media_type == "application/octet-stream"


# --- the routes over a stand-in Classifier -------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Classifier:
    package = make_color_package(tmp_path_factory.mktemp("oip") / "color")
    settings = ServiceSettings(model=str(package), device="cpu", max_batch_images=8, max_body_bytes=100_000)
    return Classifier(settings)


@pytest.fixture(scope="module")
def client(classifier):
    app = service_app.create_app()  # the service's own Starlette app: its ApiError handler renders the JSON errors
    service_app.attach(app, classifier)  # mounts service.oip's routes
    with TestClient(app) as test_client:
        test_client.portal.call(classifier.start)  # the batcher runs on the test client's event loop
        yield test_client
        test_client.portal.call(classifier.stop)


def test_server_metadata_and_health(client):
    server = client.get("/v2").json()
    assert server["name"] == "visionserve"
    assert isinstance(server["version"], str) and server["extensions"] == [
        "binary_tensor_data",
        "model_configuration",
        "statistics",
        "model_repository",
    ]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/color/ready").json() == {"name": "color", "ready": True}
    assert client.get("/v2/models/color/versions/1/ready").status_code == 200


def test_model_metadata_describes_the_package(client, classifier):
    for path in ("/v2/models/color", "/v2/models/color/versions/1"):
        metadata = client.get(path).json()
        assert metadata["name"] == "color"
        assert metadata["versions"] == ["1"]
        assert metadata["platform"] == "onnx_onnxv1"
        assert metadata["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
        assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
        parameters = metadata["parameters"]
        assert parameters["classes"] == list(COLOR_CLASSES)
        assert parameters["sha256"] == classifier.package.sha256("onnx")
        assert parameters["execution_provider"] == "CPUExecutionProvider"
        assert parameters["device"] == "cpu"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/other",
        "/v2/models/other/ready",
        "/v2/models/color/versions/2",
        "/v2/models/color/versions/2/ready",
    ],
)
def test_unknown_model_or_version_is_404(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "unknown" in response.json()["error"]


def test_infer_with_a_pixels_tensor_returns_each_images_own_class(client):
    labels = ["blue", "red", "green", "green", "red"]
    pixels = np.concatenate([color_pixels(label) for label in labels])
    response = client.post("/v2/models/color/infer", content=body(pixels_input(pixels), id="x1"))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["id"] == "x1"
    assert (result["model_name"], result["model_version"]) == ("color", "1")
    (output,) = result["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [5, 3],
    )
    probabilities = np.array(output["data"], dtype=np.float32).reshape(5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(axis=1)] == labels


def test_infer_with_encoded_images_on_the_version_path(client, classifier, monkeypatch):
    labels = ["green", "blue", "red"]
    blobs = [encode_png(color_pixels(label, size=(64, 48))[0]) for label in labels]  # resized by decode_image
    batches = []
    original_infer = classifier.infer

    async def counting_infer(pixels, deadline=None):
        batches.append(len(pixels))
        return await original_infer(pixels, deadline)

    monkeypatch.setattr(classifier, "infer", counting_infer)
    response = client.post("/v2/models/color/versions/1/infer", content=body(images_input(blobs)))
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    probabilities = np.array(output["data"]).reshape(output["shape"])
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(axis=1)] == labels
    assert batches == [3]  # the request's images go to the batcher together


def test_infer_with_binary_tensor_data_in_and_out(client):
    labels = ["red", "blue"]
    pixels = np.concatenate([color_pixels(label) for label in labels])
    raw, headers = binary_request(pixels_input(pixels), pixels.tobytes(), parameters={"binary_data_output": True})
    response = client.post("/v2/models/color/infer", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    output = json.loads(response.content[:length])["outputs"][0]
    probabilities = np.frombuffer(response.content[length:], dtype="<f4").reshape(output["shape"])
    assert [COLOR_CLASSES[i] for i in probabilities.argmax(axis=1)] == labels


@pytest.mark.parametrize(
    "blob, status",
    [
        (b"", 400),
        (_png()[:60], 400),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", 400),
        (b"GIF89a" + b"\x00" * 40, 415),
    ],
)
def test_a_bad_encoded_image_fails_the_request_with_a_json_error(client, blob, status):
    response = client.post("/v2/models/color/infer", content=body(images_input([_png(), blob])))
    assert response.status_code == status
    assert response.json()["error"]


def test_bad_requests_are_json_errors(client):
    response = client.post("/v2/models/color/infer", content=b"{not json")
    assert response.status_code == 400
    assert set(response.json()) == {"error", "code"}
    response = client.post("/v2/models/other/infer", content=body(_red()))
    assert response.status_code == 404
    response = client.post("/v2/models/color/versions/9/infer", content=body(_red()))
    assert response.status_code == 404


def test_pickle_content_type_is_refused(client):
    headers = {"Content-Type": "application/python-pickle"}
    response = client.post("/v2/models/color/infer", content=body(_red()), headers=headers)
    assert response.status_code == 415


def test_body_over_the_limit_is_413(client):
    pixels = np.full((8, 32, 32, 3), 255, dtype=np.uint8)  # about 15 KB of JSON per image: over 100,000 bytes
    response = client.post("/v2/models/color/infer", content=body(pixels_input(pixels)))
    assert response.status_code == 413
    assert "limit" in response.json()["error"]
    assert response.json()["code"] == "body_too_large"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels and that has no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_limit_is_image_too_large_as_on_classify(client):
    response = client.post(
        "/v2/models/color/infer", content=body(images_input([_png(), png_header_only(10_000, 10_000)]))
    )
    assert response.status_code == 413
    assert response.json()["code"] == "image_too_large"
    assert response.json()["error"].startswith("element 1 of 'images'")


def test_a_base64_element_may_be_a_data_url_as_on_classify():
    encoded = "data:image/png;base64," + base64.b64encode(_png()).decode()
    parsed = parse_infer_request(body(images_input([_png()], data=[encoded])), LIMITS)
    assert parsed.encoded == (_png(),)


def test_not_ready_is_false_in_health_and_503_in_inference(client, monkeypatch):
    monkeypatch.setattr(Classifier, "ready", property(lambda self: False))
    # The protocol: "a 4xx status code indicates false".
    assert client.get("/v2/health/ready").status_code == 400
    model_ready = client.get("/v2/models/color/ready")
    assert model_ready.status_code == 400
    assert model_ready.json() == {"name": "color", "ready": False}
    response = client.post("/v2/models/color/infer", content=body(_red()))
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert client.get("/v2/health/live").status_code == 200


def test_a_failed_warm_up_makes_the_server_not_live(client, classifier, monkeypatch):
    monkeypatch.setattr(classifier, "failure", "warm-up failed: test")
    response = client.get("/v2/health/live")
    assert (response.status_code, response.json()) == (400, {"live": False})


def test_overload_from_the_batcher_passes_through_with_retry_after(client, classifier, monkeypatch):
    async def overloaded(pixels, deadline=None):
        raise ApiError("queue_full", "the queue is full", {"Retry-After": "1"})

    monkeypatch.setattr(classifier, "infer", overloaded)
    response = client.post("/v2/models/color/infer", content=body(_red()))
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"] == "the queue is full"


# --- the running server (bentoml serve; S1's session fixture) -----------------------------------------------


@pytest.fixture(scope="module")
def server_client(color_service):
    with httpx.Client(base_url=color_service.url, timeout=30) as http:
        yield http


@pytest.mark.e2e
def test_served_v2_health_and_metadata(server_client):
    assert server_client.get("/v2/health/live").json() == {"live": True}
    assert server_client.get("/v2/health/ready").json() == {"ready": True}
    assert server_client.get("/v2").json()["name"] == "visionserve"
    metadata = server_client.get("/v2/models/color").json()
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    # device=auto on this CPU-only machine: the fallback is reported, with the provider really in use.
    assert metadata["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert metadata["parameters"]["device"] == "cpu"
    assert server_client.get("/v2/models/nope").status_code == 404


@pytest.mark.e2e
def test_served_v2_infer_under_concurrency_never_mixes_results(color_service):
    rng = np.random.default_rng(1)
    requests = [list(rng.choice(COLOR_CLASSES, size=int(rng.integers(1, 4)))) for _ in range(40)]

    async def infer(http: httpx.AsyncClient, index: int, labels: list[str]) -> list[str]:
        pixels = np.concatenate([color_pixels(label) for label in labels])
        # Half as encoded images, half as pixel tensors.
        tensor = images_input([encode_png(p) for p in pixels]) if index % 2 else pixels_input(pixels)
        response = await http.post("/v2/models/color/infer", content=body(tensor, id=str(index)))
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["id"] == str(index)
        output = result["outputs"][0]
        probabilities = np.array(output["data"]).reshape(output["shape"])
        return [COLOR_CLASSES[i] for i in probabilities.argmax(axis=1)]

    async def all_at_once() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=color_service.url, timeout=30) as http:
            return await asyncio.gather(*(infer(http, i, labels) for i, labels in enumerate(requests)))

    assert asyncio.run(all_at_once()) == requests


@pytest.mark.e2e
@pytest.mark.parametrize(
    "content, status",
    [
        (b"{oops", 400),
        (body(_red(datatype="FP32")), 400),
        (body(_red(shape=[0, 32, 32, 3], data=[])), 400),
        (body(images_input([b"GIF89a" + b"\x00" * 40])), 415),
    ],
)
def test_served_v2_bad_requests_are_json_errors(server_client, content, status):
    response = server_client.post("/v2/models/color/infer", content=content)
    assert response.status_code == status
    assert response.json()["error"]
