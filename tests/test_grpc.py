"""The Open Inference Protocol over gRPC (service.grpc_server): the request conversion and the RPCs in this process
(a grpc.aio server over a started Classifier, the generated stub as client), then tritonclient.grpc against real
servers, whose answers must equal the HTTP routes' (tritonclient.http) for the same inputs."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import urllib.request

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import descriptor_pool, json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton
from tritonclient.utils import InferenceServerException

from benchmarks.servers import free_port
from inference.imaging import encode_png
from service import grpc_server
from service.auth import AccessControl, hash_key
from service.classifier import Classifier
from service.errors import ERRORS, ApiError
from service.oip import InputLimits
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import COLOR_CLASSES, color_pixels, make_color_package
from tests.support.servers import (
    SERVICE_TEST_SETTINGS,
    listener,
    make_slow_color_package,
    start_server,
    stop_server,
    wait_until,
    workers,
)
from tests.support.tls import needs_openssl, self_signed_certificate

LIMITS = InputLimits((32, 32), max_images=8, max_image_bytes=1000)
KEY = "grpc-test-key"


def jpeg(label: str, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(255 if c == label else 0 for c in COLOR_CLASSES)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def infer_request(
    name: str, datatype: str, shape: list[int], raw: bytes | None = None, **contents
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="color", id="r1")
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


# ---- the conversion to the REST parser's request ----------------------------------------------------------------


def test_raw_pixels_typed_pixels_and_bytes_elements_parse_as_the_rest_route():
    pixels = color_pixels("green", batch=2)
    raw = grpc_server.parse_infer_request(infer_request("pixels", "UINT8", [2, 32, 32, 3], pixels.tobytes()), LIMITS)
    typed = grpc_server.parse_infer_request(
        infer_request("pixels", "UINT8", [2, 32, 32, 3], uint_contents=pixels.ravel().tolist()), LIMITS
    )
    assert raw.id == typed.id == "r1"
    np.testing.assert_array_equal(raw.pixels, pixels)
    np.testing.assert_array_equal(typed.pixels, pixels)
    blobs = [b"first", b"second image"]
    framed = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    assert grpc_server.parse_infer_request(infer_request("images", "BYTES", [2], framed), LIMITS).encoded == tuple(
        blobs
    )
    typed_bytes = infer_request("images", "BYTES", [2], bytes_contents=blobs)
    assert grpc_server.parse_infer_request(typed_bytes, LIMITS).encoded == tuple(blobs)


def _two_raw_entries() -> pb.ModelInferRequest:
    request = infer_request("pixels", "UINT8", [1, 32, 32, 3], bytes(3072))
    request.raw_input_contents.append(b"extra")
    return request


def _raw_and_contents() -> pb.ModelInferRequest:
    return infer_request("pixels", "UINT8", [1, 32, 32, 3], bytes(3072), uint_contents=[0] * 3072)


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (infer_request("pixels", "FP32", [1, 32, 32, 3], bytes(4 * 3072)), "invalid_request", "datatype UINT8"),
        (infer_request("pixels", "FP32", [1, 32, 32, 3], fp32_contents=[0.0] * 3072), "invalid_request", "UINT8"),
        (infer_request("pixels", "UINT8", [1, 32, 32, 3]), "invalid_request", "has no data"),
        (infer_request("pixels", "UINT8", [1, 32, 32, 3], bytes(100)), "invalid_request", "3072 bytes"),
        (infer_request("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[256] * 3072), "invalid_request", "0..255"),
        (infer_request("pixels", "UINT8", [9, 32, 32, 3], bytes(9 * 3072)), "too_many_images", "limit of 8"),
        (infer_request("images", "BYTES", [1], bytes_contents=[bytes(1001)]), "image_too_large", "1000 bytes"),
        (infer_request("logits", "UINT8", [1], b"x"), "invalid_request", "unknown input"),
        (_two_raw_entries(), "invalid_request", "2 entries for 1 input"),
        (_raw_and_contents(), "invalid_request", "both contents and raw_input_contents"),
        (pb.ModelInferRequest(model_name="color"), "invalid_request", "non-empty list"),
    ],
)
def test_bad_infer_requests_get_the_rest_routes_codes(request_, code, words):
    with pytest.raises(ApiError) as caught:
        grpc_server.parse_infer_request(request_, LIMITS)
    assert caught.value.code == code
    assert words in caught.value.message


def test_every_error_status_has_a_grpc_status():
    statuses = {error.status for error in ERRORS.values() if error.status is not None}
    assert statuses <= set(grpc_server.GRPC_STATUS)
    assert grpc_server.grpc_status(ApiError("queue_full", "")) == grpc.StatusCode.UNAVAILABLE
    assert grpc_server.grpc_status(ApiError("body_too_large", "")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_server.grpc_status(ApiError("unauthorized", "")) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_server.grpc_status(ApiError("deadline_exceeded", "")) == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_the_grpc_port_is_checked(port):
    with pytest.raises(SettingsError, match="VISIONSERVE_GRPC_PORT"):
        ServiceSettings.from_env({"VISIONSERVE_GRPC_PORT": port})


def test_generated_messages_live_beside_tritonclients():
    # Both declare `inference.*`: ours are in a descriptor pool of their own (service/protos/generate.py).
    ours = pb.ModelInferResponse(model_name="color", raw_output_contents=[b"\x00" * 4])
    theirs = triton.ModelInferResponse.FromString(ours.SerializeToString())
    assert theirs.model_name == "color" and theirs.raw_output_contents == [b"\x00" * 4]
    assert pb_grpc.GRPCInferenceServiceServicer.ModelInfer  # the service's methods, as the protocol names them


# ---- the RPCs in this process --------------------------------------------------------------------------------------


class InProcess:
    """A started Classifier and its gRPC server on one event loop; calls through the generated stub on that loop."""

    def __init__(self, package, access: AccessControl, settings: dict[str, str] | None = None) -> None:
        self.runner = asyncio.Runner()
        self.port = free_port()
        settings = ServiceSettings.from_env(
            {
                **SERVICE_TEST_SETTINGS,
                "VISIONSERVE_MODEL": str(package),
                "VISIONSERVE_GRPC_PORT": str(self.port),
                "VISIONSERVE_GRPC_HOST": "127.0.0.1",
                **(settings or {}),
            }
        )
        self.classifier = Classifier(settings)
        self.runner.run(self.classifier.start())
        self.server = self.runner.run(grpc_server.start(self.classifier, access))
        self.channel = self.runner.run(self._channel())
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    def call(self, method: str, request, key: str | None = None, stub=None):
        """`method` of the inference service (or of `stub`) on this process's loop, with `key` if given."""
        metadata = (("authorization", f"Bearer {key}"),) if key else None

        async def call():
            return await getattr(stub or self.stub, method)(request, metadata=metadata, timeout=10)

        return self.runner.run(call())

    def error(self, method: str, request, key: str | None = None, stub=None) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            self.call(method, request, key, stub)
        return caught.value

    def close(self) -> None:
        self.runner.run(self.channel.close())
        self.runner.run(grpc_server.stop(self.server, 1.0))
        self.runner.run(self.classifier.stop())
        self.runner.close()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """In this process, with an API key required."""
    package = make_color_package(tmp_path_factory.mktemp("grpc-in-process") / "color")
    digest = bytes.fromhex(hash_key(KEY).removeprefix("sha256:"))
    served = InProcess(package, AccessControl(api_keys=(digest,)))
    yield served
    served.close()


def error_code(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata())[grpc_server.ERROR_CODE_KEY]


def test_every_rpc_but_health_wants_the_api_key(keyed):
    assert keyed.call("ServerLive", pb.ServerLiveRequest()).live
    assert keyed.call("ServerReady", pb.ServerReadyRequest()).ready
    assert keyed.call("ModelReady", pb.ModelReadyRequest(name="color")).ready
    for method, request in [
        ("ServerMetadata", pb.ServerMetadataRequest()),
        ("ModelMetadata", pb.ModelMetadataRequest(name="color")),
        ("ModelConfig", pb.ModelConfigRequest(name="color")),
        ("ModelStatistics", pb.ModelStatisticsRequest()),
        ("ModelInfer", infer_request("pixels", "UINT8", [1, 32, 32, 3], color_pixels("red").tobytes())),
    ]:
        for key in (None, "wrong"):
            error = keyed.error(method, request, key)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert error_code(error) == "unauthorized"
        keyed.call(method, request, KEY)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health_request(service: str = "") -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def test_the_standard_health_service_answers_as_server_ready_without_the_key(keyed):
    # What Kubernetes' grpc probes, grpc_health_probe and Envoy ask: the whole server, or the service by name.
    for service in ("", "inference.GRPCInferenceService"):
        assert keyed.call("Check", health_request(service), stub=keyed.health).status == SERVING
    assert keyed.error("Check", health_request("other.Service"), stub=keyed.health).code() == grpc.StatusCode.NOT_FOUND


def test_with_auth_health_the_standard_health_service_wants_the_key(tmp_path):
    digest = bytes.fromhex(hash_key(KEY).removeprefix("sha256:"))
    served = InProcess(make_color_package(tmp_path / "color"), AccessControl(api_keys=(digest,), protect_health=True))
    try:
        error = served.error("Check", health_request(), stub=served.health)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error_code(error) == "unauthorized"
        assert served.call("Check", health_request(), KEY, stub=served.health).status == SERVING

        async def first_watch_answer(key: str | None):  # a stream: a refusal arrives with its first read
            metadata = (("authorization", f"Bearer {key}"),) if key else None
            return await served.health.Watch(health_request(), metadata=metadata, timeout=10).read()

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            served.runner.run(first_watch_answer(None))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert served.runner.run(first_watch_answer(KEY)).status == SERVING
    finally:
        served.close()


def test_the_health_status_follows_readiness(monkeypatch):
    monkeypatch.setattr(grpc_server, "HEALTH_POLL_S", 0.01)

    class Repository:
        ready = False

    async def statuses() -> tuple[list[int], list[int]]:
        servicer = grpc_server.HealthServicer(Repository, AccessControl())
        checked, followed = [], []
        follower = asyncio.create_task(servicer.follow_readiness())
        for ready in (False, True, False):
            Repository.ready = ready
            await asyncio.sleep(0.05)
            # The stored status, which Watch streams: the reference servicer's own Check, without the refresh.
            followed.append((await health.aio.HealthServicer.Check(servicer, health_request(), None)).status)
            Repository.ready = not ready
            checked.append((await servicer.Check(health_request(), None)).status)  # as of the call
        follower.cancel()
        return followed, checked

    followed, checked = asyncio.run(statuses())
    assert followed == [NOT_SERVING, SERVING, NOT_SERVING]
    assert checked == [SERVING, NOT_SERVING, SERVING]


def test_a_stopping_server_tells_health_watchers_it_is_not_serving(tmp_path):
    served = InProcess(make_color_package(tmp_path / "color"), AccessControl())

    async def watch_while_stopping() -> list[int]:
        stream = served.health.Watch(health_request(), timeout=10)
        first = await stream.read()
        stopping = asyncio.create_task(grpc_server.stop(served.server, 1.0))
        second = await stream.read()
        await stopping
        return [first.status, second.status]

    try:
        assert served.runner.run(watch_while_stopping()) == [SERVING, NOT_SERVING]
    finally:
        served.close()


def client_ports(server_port: int) -> set[int]:
    """The local ports of this process's connections to `server_port` (the client side of them)."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == server_port}


@pytest.mark.slow  # seconds of RPCs across several connection ages
def test_old_connections_get_a_goaway_and_the_client_reconnects_without_failing_an_rpc(tmp_path):
    served = InProcess(
        make_color_package(tmp_path / "color"), AccessControl(), {"VISIONSERVE_CONNECTION_MAX_AGE_S": "1"}
    )
    try:
        pixels = np.concatenate([color_pixels(label) for label in COLOR_CLASSES])
        request = infer_request("pixels", "UINT8", [3, 32, 32, 3], pixels.tobytes())
        ports: set[int] = set()
        end = time.monotonic() + 4
        answered = 0
        while time.monotonic() < end:  # every RPC must succeed, across the GOAWAYs
            assert len(served.call("ModelInfer", request).outputs) == 1
            answered += 1
            ports |= client_ports(served.port)
    finally:
        served.close()
    assert answered > 20
    assert len(ports) >= 3  # a connection per second or so, not the one of a channel that never ages


@pytest.mark.slow  # waits out a connection's age and its grace: seconds
def test_a_connection_that_only_opens_http2_is_closed_at_the_max_age(tmp_path):
    # gRPC's own timeout covers the handshake only: a client that then sends nothing (and never acknowledges the
    # GOAWAY) would hold its connection for ever; the max age closes it once the grace (request timeout + 5 s) is out.
    served = InProcess(
        make_color_package(tmp_path / "color"),
        AccessControl(),
        {"VISIONSERVE_CONNECTION_MAX_AGE_S": "1", "VISIONSERVE_REQUEST_TIMEOUT_S": "1"},
    )
    preface_and_settings = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])

    async def open_and_idle() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(preface_and_settings)
        opened = time.monotonic()
        while await asyncio.wait_for(reader.read(65536), timeout=20):
            pass
        writer.close()
        return time.monotonic() - opened

    try:
        closed_after_s = served.runner.run(open_and_idle())
    finally:
        served.close()
    assert 1 <= closed_after_s < 1 + 6 + 3


def test_raw_and_typed_contents_get_the_same_answer(keyed):
    pixels = np.concatenate([color_pixels(label) for label in COLOR_CLASSES])
    raw = keyed.call("ModelInfer", infer_request("pixels", "UINT8", [3, 32, 32, 3], pixels.tobytes()), KEY)
    typed = keyed.call(
        "ModelInfer", infer_request("pixels", "UINT8", [3, 32, 32, 3], uint_contents=pixels.ravel().tolist()), KEY
    )
    assert raw.model_name == "color" and raw.model_version == "1" and raw.id == "r1"
    [output] = raw.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [3, 3])
    probabilities = np.frombuffer(raw.raw_output_contents[0], "<f4").reshape(3, 3)
    assert probabilities.argmax(axis=1).tolist() == [0, 1, 2]
    assert raw.raw_output_contents == typed.raw_output_contents


def test_refusals_carry_the_status_the_message_and_the_code(keyed):
    error = keyed.error("ModelMetadata", pb.ModelMetadataRequest(name="color", version="7"), KEY)
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_code(error) == "version_not_found"
    assert "unknown version '7'" in error.details()
    corrupt = infer_request("images", "BYTES", [1], bytes_contents=[jpeg("red")[:200]])
    error = keyed.error("ModelInfer", corrupt, KEY)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_code(error) == "corrupt"
    assert error.details().startswith("element 0 of 'images'")


def test_port_0_turns_grpc_off(tmp_path):
    settings = ServiceSettings(model=str(tmp_path), grpc_port=0)

    class Stub:
        pass

    classifier = Stub()
    classifier.settings = settings
    assert asyncio.run(grpc_server.start(classifier, AccessControl())) is None


def ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# ---- tritonclient against real servers -----------------------------------------------------------------------------


def listening_ports(worker: psutil.Process) -> set[int]:
    return {c.laddr.port for c in worker.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def worker_connections(pid: int, port: int) -> dict[int, int]:
    """Established connections to `port`, by worker process."""
    return {
        w.pid: sum(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in w.net_connections("tcp"))
        for w in workers(pid)
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real server (one worker) with gRPC on a port of its own; (grpc client, http client, grpc port, server)."""
    work_dir = tmp_path_factory.mktemp("grpc-service")
    port = free_port()
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_GRPC_PORT": str(port), "VISIONSERVE_GRPC_HOST": "127.0.0.1"}
    server = start_server(make_color_package(work_dir / "color"), work_dir, settings)
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    http_client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield grpc_client, http_client, port, server
    grpc_client.close()
    http_client.close()
    stop_server(server)


def http_json(server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=10) as response:
        return json.loads(response.read())


def as_message(values: dict, message):
    return json_format.ParseDict(values, message)


def triton_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


@pytest.mark.e2e
def test_health_and_metadata_equal_the_http_routes(served):
    grpc_client, _, port, server = served
    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready("color")
    assert grpc_client.is_model_ready("color", "1")
    # The same messages from both protocols (the REST metadata's `parameters` has no gRPC field).
    assert grpc_client.get_server_metadata() == as_message(http_json(server, "/v2"), triton.ServerMetadataResponse())
    rest_metadata = http_json(server, "/v2/models/color")
    assert rest_metadata.pop("parameters")["classes"] == list(COLOR_CLASSES)
    metadata = grpc_client.get_model_metadata("color", "1")
    assert metadata == as_message(rest_metadata, triton.ModelMetadataResponse())
    assert metadata.inputs[0].name == "pixels" and list(metadata.inputs[0].shape) == [-1, 32, 32, 3]
    config = grpc_client.get_model_config("color").config
    assert config == as_message(http_json(server, "/v2/models/color/config"), triton_config.ModelConfig())
    assert config.max_batch_size == 8 and config.input[0].name == "pixels"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the standard health service beside it
        assert health_pb2_grpc.HealthStub(channel).Check(health_request(), timeout=10).status == SERVING
        # Server reflection, as grpcurl and Postman read it: the service and its messages, without the .proto.
        reflected = ProtoReflectionDescriptorDatabase(channel)
        assert set(reflected.get_services()) == {
            "inference.GRPCInferenceService",
            "grpc.reflection.v1alpha.ServerReflection",
        }
        service = descriptor_pool.DescriptorPool(reflected).FindServiceByName("inference.GRPCInferenceService")
        assert {method.name for method in service.methods} == set(
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
        )
        infer_request = service.methods_by_name["ModelInfer"].input_type
        assert infer_request.full_name == "inference.ModelInferRequest"
        assert {"inputs", "raw_input_contents"} <= set(infer_request.fields_by_name)
    [worker] = workers(server.process.pid)
    assert listening_ports(worker) == {server.server.port, port}


@pytest.mark.e2e
def test_a_pixels_batch_answers_as_over_http(served):
    grpc_client, http_client, _, _ = served
    pixels = np.concatenate([color_pixels(label) for label in ("blue", "red", "green", "red")])
    grpc_input = grpcclient.InferInput("pixels", list(pixels.shape), "UINT8")
    grpc_input.set_data_from_numpy(pixels)
    http_input = httpclient.InferInput("pixels", list(pixels.shape), "UINT8")
    http_input.set_data_from_numpy(pixels)
    by_grpc = grpc_client.infer("color", [grpc_input], request_id="p1")
    by_http = http_client.infer("color", [http_input])
    assert by_grpc.get_response().id == "p1"
    probabilities = by_grpc.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, 3)
    assert probabilities.argmax(axis=1).tolist() == [2, 0, 1, 0]
    np.testing.assert_array_equal(probabilities, by_http.as_numpy("probabilities"))


@pytest.mark.e2e
def test_a_bytes_batch_of_encoded_images_answers_as_over_http(served):
    grpc_client, http_client, _, _ = served
    blobs = np.array([jpeg("green"), encode_png(color_pixels("blue")[0]), jpeg("red", (20, 90))], dtype=np.object_)
    grpc_input = grpcclient.InferInput("images", [3], "BYTES")
    grpc_input.set_data_from_numpy(blobs)
    http_input = httpclient.InferInput("images", [3], "BYTES")
    http_input.set_data_from_numpy(blobs)
    probabilities = grpc_client.infer("color", [grpc_input], model_version="1").as_numpy("probabilities")
    assert probabilities.argmax(axis=1).tolist() == [1, 2, 0]
    np.testing.assert_array_equal(probabilities, http_client.infer("color", [http_input]).as_numpy("probabilities"))


@pytest.mark.e2e
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclients_compression_options_answer_as_uncompressed_requests(served, algorithm):
    # Triton accepts compressed requests; before, the HTTP route read the gzip bytes as JSON and answered 400.
    grpc_client, http_client, _, _ = served
    blobs = np.array([jpeg("green"), jpeg("red")], dtype=np.object_)
    http_input = httpclient.InferInput("images", [2], "BYTES")
    http_input.set_data_from_numpy(blobs)
    plain = http_client.infer("color", [http_input]).as_numpy("probabilities")
    assert plain.argmax(axis=1).tolist() == [1, 0]
    for compressed in (
        http_client.infer("color", [http_input], request_compression_algorithm=algorithm),
        http_client.infer("color", [http_input], response_compression_algorithm=algorithm),
    ):
        np.testing.assert_array_equal(compressed.as_numpy("probabilities"), plain)
    grpc_input = grpcclient.InferInput("images", [2], "BYTES")
    grpc_input.set_data_from_numpy(blobs)
    by_grpc = grpc_client.infer("color", [grpc_input], compression_algorithm=algorithm)
    np.testing.assert_array_equal(by_grpc.as_numpy("probabilities"), plain)


@pytest.mark.e2e
def test_refusals_map_to_grpc_statuses(served):
    grpc_client, _, _, _ = served
    floats = grpcclient.InferInput("pixels", [1, 32, 32, 3], "FP32")
    floats.set_data_from_numpy(color_pixels("red").astype(np.float32))
    error = triton_error(grpc_client.infer, "color", [floats])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must have datatype UINT8, got 'FP32'" in error.message()

    pixels = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
    pixels.set_data_from_numpy(color_pixels("red"))
    error = triton_error(grpc_client.infer, "nope", [pixels])
    assert error.status() == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in error.message()
    assert triton_error(grpc_client.get_model_metadata, "nope").status() == "StatusCode.NOT_FOUND"

    # VISIONSERVE_MAX_BODY_BYTES is 500000 here: gRPC itself refuses the message before any handler runs.
    big = grpcclient.InferInput("images", [1], "BYTES")
    big.set_data_from_numpy(np.array([bytes(600_000)], dtype=np.object_))
    error = triton_error(grpc_client.infer, "color", [big])
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert grpc_client.is_server_ready()  # and the server goes on


@pytest.mark.e2e
def test_statistics_count_the_grpc_requests(served):
    grpc_client, _, _, _ = served
    before = grpc_client.get_inference_statistics("color").model_stats[0]
    pixels = grpcclient.InferInput("pixels", [2, 32, 32, 3], "UINT8")
    pixels.set_data_from_numpy(color_pixels("green", batch=2))
    grpc_client.infer("color", [pixels])
    after = grpc_client.get_inference_statistics("color").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 2


@pytest.mark.e2e
def test_a_taken_port_stops_bentoml_serve_with_one_line_before_any_worker(tmp_path):
    with listener(reuse_port=True) as held:
        port = held.getsockname()[1]
        settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_GRPC_PORT": str(port), "VISIONSERVE_GRPC_HOST": "127.0.0.1"}
        with pytest.raises(RuntimeError, match="exited with 1") as exited:
            start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    log = str(exited.value)
    assert f"visionserve: cannot serve: gRPC cannot listen on 127.0.0.1:{port}" in log
    assert "Traceback" not in log and "startup" not in log  # stopped before any worker started


@pytest.mark.e2e
@needs_openssl
def test_grpc_with_tls_answers_tritonclient_over_tls_only(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    settings = {
        **SERVICE_TEST_SETTINGS,
        "VISIONSERVE_GRPC_PORT": str(port),
        "VISIONSERVE_GRPC_HOST": "127.0.0.1",
        "VISIONSERVE_GRPC_TLS_CERTFILE": str(cert),
        "VISIONSERVE_GRPC_TLS_KEYFILE": str(key),
    }
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        secure = grpcclient.InferenceServerClient(f"localhost:{port}", ssl=True, root_certificates=str(cert))
        assert secure.is_server_ready()
        pixels = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        pixels.set_data_from_numpy(color_pixels("green"))
        assert secure.infer("color", [pixels]).as_numpy("probabilities").argmax() == 1
        secure.close()
        plaintext = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        assert triton_error(plaintext.is_server_ready).status() == "StatusCode.UNAVAILABLE"
        plaintext.close()
    finally:
        stop_server(server)


@pytest.mark.e2e
@pytest.mark.skipif(not ipv6_works(), reason="no IPv6 on this machine")
def test_grpc_listens_on_every_ipv6_interface(tmp_path):
    port = free_port()
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_GRPC_PORT": str(port), "VISIONSERVE_GRPC_HOST": "::"}
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        with grpcclient.InferenceServerClient(f"[::1]:{port}") as client:
            assert client.is_server_ready()
    finally:
        stop_server(server)


@pytest.mark.e2e
def test_port_0_serves_http_only(tmp_path):
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_GRPC_PORT": "0"}
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        [worker] = workers(server.process.pid)
        assert listening_ports(worker) == {server.server.port}
    finally:
        stop_server(server)


@pytest.mark.e2e
@pytest.mark.slow
def test_two_workers_share_the_grpc_port_and_both_answer(tmp_path):
    port = free_port()
    settings = {
        **SERVICE_TEST_SETTINGS,
        "VISIONSERVE_WORKERS": "2",
        "VISIONSERVE_GRPC_PORT": str(port),
        "VISIONSERVE_GRPC_HOST": "127.0.0.1",
    }
    server = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    clients = []
    try:
        pid = server.process.pid
        # /readyz answers once one worker is ready; the other may still be starting.
        wait_until(
            lambda: len(found := workers(pid)) == 2 and all(port in listening_ports(w) for w in found),
            f"both workers listening on {port}",
        )
        # Each client is a connection of its own (gRPC shares one between a process's channels unless told not to),
        # which the kernel gives to one worker: with 16, both get some (all on one worker: odds of 2 in 65536).
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        pixels = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        pixels.set_data_from_numpy(color_pixels("blue"))
        for _ in range(16):
            clients.append(grpcclient.InferenceServerClient(f"127.0.0.1:{port}", channel_args=own_connection))
            wait_until(clients[-1].is_server_ready, "ready")  # this connection's worker
            assert clients[-1].infer("color", [pixels]).as_numpy("probabilities").argmax() == 2
        connections = worker_connections(pid, port)
        assert sum(connections.values()) == 16 and all(connections.values()), connections
    finally:
        for client in clients:
            client.close()
        stop_server(server)


@pytest.mark.e2e
@pytest.mark.slow
def test_an_rpc_in_flight_when_the_server_stops_still_gets_its_answer(tmp_path):
    port = free_port()
    settings = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_GRPC_PORT": str(port), "VISIONSERVE_GRPC_HOST": "127.0.0.1"}
    server = start_server(make_slow_color_package(tmp_path / "slow"), tmp_path, settings)  # about 2 s a call
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    answered = threading.Event()
    outcome = {}

    def callback(result, error):
        outcome.update(result=result, error=error)
        answered.set()

    try:
        pixels = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        pixels.set_data_from_numpy(color_pixels("green"))
        client.async_infer("slow-color", [pixels], callback)
        time.sleep(0.5)  # in the model by now
    finally:
        stop_server(server)  # SIGTERM: the shutdown hook stops gRPC with a grace period, then the batcher
    assert answered.wait(10)
    client.close()
    assert outcome["error"] is None, outcome["error"]
    assert outcome["result"].as_numpy("probabilities").argmax() == 1
