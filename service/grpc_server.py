"""The Open Inference Protocol over gRPC (KServe v2 `inference.GRPCInferenceService`), beside the HTTP routes.

A grpc.aio server on VISIONSERVE_GRPC_PORT (8001 by default, 0 = off), started in each BentoML worker by the
service's startup hook on that worker's event loop, so it shares the worker's models (service.repository): gRPC and
HTTP requests join the same batches, queues, limits, statistics and metrics, and every model and loaded version is
served (an empty `version` is the model's default). The repository extension (load, unload) is HTTP only. Every
worker binds the same port with SO_REUSEPORT and the kernel spreads *connections* (not requests) over them, as it
does for BentoML's HTTP socket.

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, and Triton's ModelConfig and
ModelStatistics (perf_analyzer asks for both); any other answers UNIMPLEMENTED. Beside it, the standard gRPC health
service (grpc.health.v1.Health: Kubernetes' grpc probes, grpc_health_probe, Envoy), whose status follows
ServerReady, and server reflection. With VISIONSERVE_GRPC_TLS_CERTFILE and _KEYFILE the port speaks TLS.
ModelInfer takes the REST route's inputs (service.oip): `pixels` UINT8 [N, H, W, 3] or `images` BYTES [N] of
encoded images, in `raw_input_contents` (whose layout is that of Triton's binary extension over HTTP) or in
`contents`; the request is checked by the REST route's own parser, and the probabilities come back in
`raw_output_contents`.

A refusal carries the ApiError's message and a status from GRPC_STATUS, with its code of service.errors in the
trailing metadata `visionserve-error-code` (and `retry-after` on 503s). A message over VISIONSERVE_MAX_BODY_BYTES
is refused by gRPC itself with RESOURCE_EXHAUSTED. With API keys set (service.auth), every RPC needs the metadata
`authorization: Bearer KEY`, except the health RPCs unless VISIONSERVE_AUTH_HEALTH=true, as over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inference.package import OUTPUT_PROBABILITIES
from service import listening, oip
from service.auth import AccessControl
from service.classifier import Classifier
from service.errors import ApiError
from service.metrics import service_metrics
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from service.repository import ModelRepository, as_repository
from service.request_reading import admit_when_warm
from service.settings import ServiceSettings

log = logging.getLogger(__name__)

# The gRPC status of each HTTP status that service.errors uses.
GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,  # HTTP only (a route's wrong method), listed for completeness
    408: grpc.StatusCode.DEADLINE_EXCEEDED,  # HTTP only (a request head too slow), listed for completeness
    409: grpc.StatusCode.ABORTED,  # HTTP only (a load while another runs), listed for completeness
    # What gRPC answers itself for a message over the size limit; an image over a limit is the same refusal.
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.FAILED_PRECONDITION,  # HTTP only (a version refused at load), listed for completeness
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,  # HTTP only (a request head too large), listed for completeness
    500: grpc.StatusCode.INTERNAL,
    # Not ready, queue full, shutting down: worth retrying, which UNAVAILABLE says to gRPC clients.
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
ERROR_CODE_KEY = "visionserve-error-code"  # trailing metadata: the refusal's code of service.errors
# Typed `contents` field of each datatype the model's inputs take (the alternative to raw_input_contents).
CONTENTS_FIELDS = {"UINT8": "uint_contents", "BYTES": "bytes_contents"}


def grpc_status(error: ApiError) -> grpc.StatusCode:
    return GRPC_STATUS.get(error.status, grpc.StatusCode.UNKNOWN)


def rest_request(request: pb.ModelInferRequest) -> tuple[bytes, bytes]:
    """A ModelInferRequest as the REST route's JSON and binary data (Triton's binary extension), for oip's parser.

    Raises ApiError (400) for what only gRPC can get wrong: raw contents that do not match the inputs.
    """
    inputs = [
        {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)} for tensor in request.inputs
    ]
    binary = b""
    if inputs:
        first = request.inputs[0]
        raw = request.raw_input_contents
        if raw:
            if len(raw) != len(inputs):
                raise oip.bad_request(f"raw_input_contents has {len(raw)} entries for {len(inputs)} input tensors")
            if first.HasField("contents"):
                raise oip.bad_request(f"input {first.name!r} has both contents and raw_input_contents")
            binary = raw[0]
        elif first.HasField("contents"):
            binary = _contents_bytes(first)
        else:
            raise oip.bad_request(f"input {first.name!r} has no data: set raw_input_contents or its contents")
        # The parser refuses a second input before it looks at any data.
        inputs[0]["parameters"] = {"binary_data_size": len(binary)}
    header: dict[str, Any] = {"inputs": inputs, "outputs": [{"name": output.name} for output in request.outputs]}
    if request.id:
        header["id"] = request.id
    return json.dumps(header).encode(), binary


def _contents_bytes(tensor: pb.ModelInferRequest.InferInputTensor) -> bytes:
    """A tensor's typed contents as raw bytes; a datatype the model does not take gives none (the parser says why)."""
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        return b""
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        return b"".join(len(element).to_bytes(4, "little") + element for element in values)
    pixels = np.asarray(values, dtype=np.uint32)
    if pixels.size and pixels.max() > 255:
        raise oip.bad_request(f"input {tensor.name!r} must hold integers in 0..255 (UINT8)")
    return pixels.astype(np.uint8).tobytes()


def parse_infer_request(request: pb.ModelInferRequest, limits: oip.InputLimits) -> oip.InferRequest:
    """A ModelInferRequest -> the validated InferRequest of the REST route, with its checks and messages."""
    header, binary = rest_request(request)
    return oip.parse_infer_request(header, limits, binary)


def _message(values: dict[str, Any], message: Any) -> Any:
    """`message` filled from a REST answer's JSON (the same field names); a field that the REST answer has and the
    gRPC message lacks (model metadata's `parameters`, or one added to the REST side first) is left out, not
    fatal; tests/test_grpc.py compares the two protocols' answers."""
    return json_format.ParseDict(values, message, ignore_unknown_fields=True)


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


async def refuse(context: grpc.aio.ServicerContext, error: ApiError) -> None:
    """End the RPC with the refusal's gRPC status and message, its code (and headers) as trailing metadata."""
    service_metrics().rejected_requests.labels(reason=error.code).inc()
    trailing = ((ERROR_CODE_KEY, error.code), *((k.lower(), v) for k, v in error.headers.items()))
    await context.abort(grpc_status(error), error.message, trailing)


def check_key(access: AccessControl, context: grpc.aio.ServicerContext, health: bool) -> None:
    """The API-key check of an RPC (ApiError 401): every RPC's, a health RPC's only when VISIONSERVE_AUTH_HEALTH is
    on, as over HTTP."""
    if not health or access.protect_health:
        access.check(_metadata_value(context, "authorization"))


def rpc(health: bool = False) -> Callable[[Handler], Handler]:
    """An RPC method: the API-key check (health RPCs only when VISIONSERVE_AUTH_HEALTH is on), and every
    ApiError (or unexpected error) turned into the gRPC status with the message and the code as metadata."""

    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def handler(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check_key(self.access, context, health)
                return await method(self, request, context)
            except ApiError as exc:
                error = exc
            except Exception as exc:  # not asyncio.CancelledError: a cancelled RPC has nobody to answer
                log.error("unhandled error in gRPC %s", method.__name__, exc_info=exc)
                error = ApiError("internal", "internal server error")
            await refuse(context, error)

        return handler

    return wrap


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over every served model; the answers are those of the REST routes (service.oip)."""

    def __init__(self, served: ModelRepository | Classifier, access: AccessControl) -> None:
        self.repository = as_repository(served)
        self.access = access  # the same keys and check as auth.check_authorization's

    def chosen(self, name: str, version: str) -> Classifier:
        """The model `name` at `version` (its default when empty); 404 with the REST routes' messages."""
        return self.repository.get(name, version or None)

    @rpc(health=True)
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.repository.failure is None)

    @rpc(health=True)
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.repository.ready))

    @rpc(health=True)  # Triton, and the HTTP key check (service.auth), count model readiness as health too
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=bool(self.chosen(request.name, request.version).ready))

    @rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return _message(oip.server_metadata(), pb.ServerMetadataResponse())

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        classifier = self.chosen(request.name, request.version)
        metadata = oip.model_metadata(classifier, self.repository.versions(classifier.package.name))
        return _message(metadata, pb.ModelMetadataResponse())

    @rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        config = oip.classifier_config(self.chosen(request.name, request.version))
        return pb.ModelConfigResponse(config=_message(config, pb.ModelConfig()))

    @rpc()
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        # No name: every model's; a name without a version: every loaded version of it.
        stats = oip.statistics(self.repository, request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(
            model_stats=[_message(entry, pb.ModelStatistics()) for entry in stats["model_stats"]]
        )

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        # Held until the answer: a rollout meanwhile leaves this request on the version that admitted it.
        with self.repository.lease(request.model_name, request.model_version or None) as classifier:
            probabilities = await self._infer(classifier, request, context)
        package = classifier.package
        output = pb.ModelInferResponse.InferOutputTensor(
            name=OUTPUT_PROBABILITIES, datatype="FP32", shape=list(probabilities.shape)
        )
        return pb.ModelInferResponse(
            model_name=package.name,
            model_version=package.version,
            id=request.id,
            outputs=[output],
            raw_output_contents=[probabilities.astype("<f4").tobytes()],  # little-endian, row-major
        )

    async def _infer(self, classifier: Classifier, request: pb.ModelInferRequest, context) -> np.ndarray:
        loop = asyncio.get_running_loop()
        # The request timeout from arrival, or the client's own gRPC deadline if that comes first.
        timeout = classifier.settings.request_timeout_s
        remaining = context.time_remaining()
        deadline = loop.time() + (timeout if remaining is None else min(timeout, remaining))
        await admit_when_warm(classifier)
        limits = oip.input_limits(classifier)  # as the REST routes': one image no bigger than the whole message
        if request.raw_input_contents:  # a view of the bytes: nothing worth a thread hop
            parsed = parse_infer_request(request, limits)
        else:  # typed contents: a Python loop over every element, off the event loop as the REST route's JSON
            parsed = await classifier.run_in_pool(parse_infer_request, request, limits)
        return await oip.infer_parsed(classifier, parsed, deadline)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The whole server ("") and the inference service by name: a probe may ask for either.
HEALTH_SERVICES = ("", SERVICE_NAME)
HEALTH_POLL_S = 0.5


class HealthServicer(health.aio.HealthServicer):
    """grpc's reference health service, its status that of ServerReady: NOT_SERVING until the warm-up ends, SERVING
    while the models are ready, NOT_SERVING from the shutdown on. Behind the API key only where
    VISIONSERVE_AUTH_HEALTH puts ServerReady behind it (a Kubernetes grpc probe sends no metadata)."""

    def __init__(self, repository: ModelRepository, access: AccessControl) -> None:
        super().__init__()
        self.repository = repository
        self.access = access

    async def refresh(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        status = serving if self.repository.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in HEALTH_SERVICES:
            await self.set(service, status)  # ignored once the shutdown has begun

    async def follow_readiness(self) -> None:
        """Refresh every HEALTH_POLL_S, so that Watch streams the changes."""
        while True:
            await self.refresh()
            await asyncio.sleep(HEALTH_POLL_S)

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        await self._authorize(context)
        await self.refresh()  # as of this call, as ServerReady's answer
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        await self._authorize(context)
        await super().Watch(request, context)

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        try:
            check_key(self.access, context, health=True)
        except ApiError as exc:
            await refuse(context, exc)


@dataclass
class GrpcServer:
    """A started gRPC server, its health service and the task that keeps that service's status current."""

    server: grpc.aio.Server
    health: HealthServicer
    follower: asyncio.Task


class GrpcStartError(RuntimeError):
    """The gRPC server could not listen (its port is taken, or not ours to take)."""


def tls_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    """The server side of TLS from the settings' PEM certificate (chain) and private key."""
    with open(settings.grpc_tls_certfile, "rb") as cert, open(settings.grpc_tls_keyfile, "rb") as key:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


async def start(served: ModelRepository | Classifier, access: AccessControl) -> GrpcServer | None:
    """Serve the protocol on the settings' gRPC host and port on the running event loop; None when the port is 0."""
    settings = served.settings
    if not settings.grpc_port:
        return None
    options = [
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        # On by default on Linux; said here because every worker binds the same port.
        ("grpc.so_reuseport", 1),
    ]
    if settings.connection_max_age_s:
        # A GOAWAY past the age: the client's channel reconnects (possibly to another replica), and the RPCs in
        # flight have the request timeout and 5 s more to finish.
        options += [
            ("grpc.max_connection_age_ms", int(settings.connection_max_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int((settings.request_timeout_s + 5) * 1000)),
        ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(served, access), server)
    health_servicer = HealthServicer(as_repository(served), access)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Server reflection, for grpcurl, Postman and Evans: the inference service's messages come from the generated
    # modules' own descriptor pool (service.protos keeps it apart from tritonclient's copy of the same names).
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server, pool=pb.DESCRIPTOR.pool)
    address = listening.address(settings.grpc_host, settings.grpc_port)  # an IPv6 host in brackets, as gRPC takes it
    try:
        if settings.grpc_tls_certfile:
            server.add_secure_port(address, tls_credentials(settings))
        else:
            server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcStartError(f"visionserve: cannot serve gRPC on {address} (VISIONSERVE_GRPC_PORT): {exc}") from None
    follower = asyncio.get_running_loop().create_task(health_servicer.follow_readiness())
    await server.start()
    log.info(
        "gRPC (Open Inference Protocol) listening on %s%s", address, " with TLS" if settings.grpc_tls_certfile else ""
    )
    return GrpcServer(server, health_servicer, follower)


async def stop(running: GrpcServer | None, grace_s: float) -> None:
    """Report NOT_SERVING to health checks, refuse new RPCs at once and let those in flight finish for up to
    `grace_s` seconds."""
    if running is not None:
        running.follower.cancel()
        await running.health.enter_graceful_shutdown()
        await running.server.stop(grace_s)
