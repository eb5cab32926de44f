"""The service's configuration: one frozen dataclass read from `VISIONSERVE_*` environment variables."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from inference.imaging import DEFAULT_MAX_PIXELS
from inference.package import BACKEND_FILES
from inference.runtime import DEVICES, cpu_threads

ENV_PREFIX = "VISIONSERVE_"
# The BentoML model-store tag that the export stage registers and bentofile.yaml packs into the Bento.
DEFAULT_MODEL_TAG = "visionserve-classifier:latest"
# A browser origin as it sends it: scheme://host[:port], nothing after.
ORIGIN = re.compile(r"^https?://[^/\s]+$")


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class ServiceSettings:
    # A package folder, or a BentoML model-store tag ("name" or "name:version") holding the package files; several,
    # comma-separated, serve one model each (named by its manifest), and the Bento built with them packs every tag.
    model: str = DEFAULT_MODEL_TAG
    # A model repository (Triton's layout, DIR/<name>/<version>/manifest.json; docs/models.md): every model in it is
    # served. Set, it replaces VISIONSERVE_MODEL.
    repository: str = ""
    # Seconds between scans of the repository for new versions (each worker loads them itself); 0 = no polling.
    repository_poll_s: float = 0.0
    backend: str = "onnx"  # onnx | onnx-int8 | torchscript
    device: str = "auto"  # auto | cuda | cpu
    max_batch_size: int = 64  # images per model call
    # How long a batch may wait for more images, counted from its first request's arrival; the wait only happens
    # while other requests are being decoded (known to be on their way) or another model instance's call runs.
    # 0 = purely greedy.
    max_latency_ms: float = 5.0
    max_queue: int = 512  # images waiting for the model; past it requests get 503 + Retry-After at once
    request_timeout_s: float = 10.0  # from arrival to answer; past it 504
    # From a connection's opening or last answer to a complete request head; past it the connection is closed
    # (service.http_protocol). 0 = uvicorn's behaviour: no limit.
    request_head_timeout_s: float = 10.0
    # An HTTP connection older than this gets `Connection: close` with its next answer, and a gRPC connection a
    # GOAWAY, so that clients reconnect and replicas added behind a balancer get their share. 0 = never.
    connection_max_age_s: float = 60.0
    max_body_bytes: int = 16 * 1024 * 1024  # a request body over this gets 413 without being read
    # Bytes of bodies larger than 256 KiB being received at once in a worker; past it such uploads get 503 before
    # their bodies are read.
    max_upload_bytes_in_flight: int = 128 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # width * height from the header; over it 413 before decoding
    max_batch_images: int = 64  # images in one /classify_batch (or v2 infer) request
    # Server processes, each with its own event loop, batcher and model session. Python work per request bounds
    # what one event loop serves, so a small model on many cores wants several. 0 = chosen at start from the cores
    # and the model's measured cost (service.defaults).
    workers: int = 0
    threads: int = 0  # ONNX Runtime / torch intra-op threads per worker; 0 = this process's cores / workers
    # With several workers, every this-many answers a worker compares its share of the requests with an even one;
    # well above it, it asks that client to reconnect (`Connection: close`), so that keep-alive connections leave
    # the busier worker (service.connections). 0 = never.
    rebalance_every: int = 50
    # Model calls that may run at once in a worker, each with threads / model_instances runtime threads. 2 suits a
    # compute-bound model on the CPU: a call's threads split each layer's work evenly, so when the event loop takes
    # one of their cores the others wait for it; two single-threaded calls have nothing to wait for
    # (benchmarks/results/service_load.md). 1 suits a small model: the event loop is its limit, not the cores.
    model_instances: int = 1
    # TF32 on the GPU (ONNX Runtime's CUDA provider): faster on Ampere and later, outputs no longer within the
    # export gate's 1e-4 of the float32 it verified. Off by default.
    tf32: bool = False
    # API keys (service.auth): a file of `sha256:<hex>` lines, one per key (`python -m service.auth hash` makes a
    # line). Set: every prediction and metadata route wants `Authorization: Bearer KEY`. Empty: the routes are open.
    api_keys_file: str = ""
    # The keys of the routes that load or unload models (/v2/repository/models/...); without the file such routes
    # refuse every call.
    admin_keys_file: str = ""
    # Also want a key for /livez, /readyz, /metrics and the v2 health routes (probes then need one too).
    auth_health: bool = False
    # Comma-separated origins (https://app.example.com) whose browser pages may call the API; empty = no CORS.
    cors_origins: str = ""
    # The Open Inference Protocol over gRPC (service.grpc_server), served by every worker on this port (SO_REUSEPORT
    # lets them share it); 8001 as in Triton. 0 turns it off.
    grpc_port: int = 8001
    # The interface it listens on: 0.0.0.0 is every IPv4 one, as BentoML's HTTP default; :: (or [::]) every IPv6 one.
    grpc_host: str = "0.0.0.0"
    # TLS for gRPC: a PEM certificate (chain) and its private key, both or neither. Without them gRPC is plaintext,
    # which `bentoml serve` refuses while HTTP has TLS (--ssl-certfile); the same files serve both.
    grpc_tls_certfile: str = ""
    grpc_tls_keyfile: str = ""

    def __post_init__(self) -> None:
        if not self.model_references:
            raise SettingsError(f"{ENV_PREFIX}MODEL must name a package folder or a BentoML model tag")
        if self.backend not in BACKEND_FILES:
            raise SettingsError(f"{ENV_PREFIX}BACKEND={self.backend!r} is unknown; valid: {', '.join(BACKEND_FILES)}")
        if self.device not in DEVICES:
            raise SettingsError(f"{ENV_PREFIX}DEVICE={self.device!r} is unknown; valid: {', '.join(DEVICES)}")
        for name in (
            "max_batch_size",
            "max_queue",
            "max_body_bytes",
            "max_upload_bytes_in_flight",
            "max_image_pixels",
            "max_batch_images",
            "model_instances",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be >= 1, got {getattr(self, name)}")
        if self.max_latency_ms < 0:
            raise SettingsError(f"{ENV_PREFIX}MAX_LATENCY_MS must be >= 0, got {self.max_latency_ms}")
        if self.request_timeout_s <= 0:
            raise SettingsError(f"{ENV_PREFIX}REQUEST_TIMEOUT_S must be > 0, got {self.request_timeout_s}")
        if self.request_head_timeout_s < 0:
            raise SettingsError(
                f"{ENV_PREFIX}REQUEST_HEAD_TIMEOUT_S must be >= 0 (0: no limit), got {self.request_head_timeout_s}"
            )
        if self.connection_max_age_s < 0:
            raise SettingsError(
                f"{ENV_PREFIX}CONNECTION_MAX_AGE_S must be >= 0 (0: never), got {self.connection_max_age_s}"
            )
        if not 0 <= self.grpc_port <= 65535:
            raise SettingsError(f"{ENV_PREFIX}GRPC_PORT must be a port number (0 turns gRPC off), got {self.grpc_port}")
        if self.grpc_port and not self.grpc_host.strip():
            raise SettingsError(f"{ENV_PREFIX}GRPC_HOST must name an interface (0.0.0.0: all) when gRPC is on")
        if bool(self.grpc_tls_certfile) != bool(self.grpc_tls_keyfile):
            raise SettingsError(
                f"{ENV_PREFIX}GRPC_TLS_CERTFILE and {ENV_PREFIX}GRPC_TLS_KEYFILE go together: set both, or neither"
            )
        if self.threads < 0:
            raise SettingsError(f"{ENV_PREFIX}THREADS must be >= 0, got {self.threads}")
        if self.rebalance_every < 0:
            raise SettingsError(f"{ENV_PREFIX}REBALANCE_EVERY must be >= 0 (0: never), got {self.rebalance_every}")
        if self.workers < 0:
            raise SettingsError(f"{ENV_PREFIX}WORKERS must be >= 0 (0: chosen at start), got {self.workers}")
        if self.repository_poll_s < 0:
            raise SettingsError(f"{ENV_PREFIX}REPOSITORY_POLL_S must be >= 0, got {self.repository_poll_s}")
        if self.repository_poll_s and not self.repository:
            raise SettingsError(f"{ENV_PREFIX}REPOSITORY_POLL_S polls a repository: set {ENV_PREFIX}REPOSITORY too")
        if self.max_upload_bytes_in_flight < self.max_body_bytes:
            # A body of the largest allowed size could never be received.
            raise SettingsError(
                f"{ENV_PREFIX}MAX_UPLOAD_BYTES_IN_FLIGHT ({self.max_upload_bytes_in_flight}) must not be below "
                f"{ENV_PREFIX}MAX_BODY_BYTES ({self.max_body_bytes})"
            )
        if self.max_batch_images > self.max_queue:
            # A request bigger than the whole queue could never be admitted.
            raise SettingsError(
                f"{ENV_PREFIX}MAX_BATCH_IMAGES ({self.max_batch_images}) must not exceed "
                f"{ENV_PREFIX}MAX_QUEUE ({self.max_queue})"
            )
        for origin in self.cors_origin_list:
            if origin != "*" and not ORIGIN.match(origin):
                raise SettingsError(
                    f"{ENV_PREFIX}CORS_ORIGINS has {origin!r}; an origin is scheme://host[:port] (or *), comma-separated"
                )

    @property
    def model_references(self) -> list[str]:
        """VISIONSERVE_MODEL's package folders and model-store tags, in order."""
        return [reference.strip() for reference in self.model.split(",") if reference.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip().rstrip("/") for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def threads_per_worker(self) -> int:
        return self.threads or max(1, cpu_threads() // max(1, self.workers))

    @property
    def threads_per_instance(self) -> int:
        """Runtime intra-op threads of each model call."""
        return max(1, self.threads_per_worker // self.model_instances)

    def request_deadline(self) -> float:
        """The running event loop's time at which a request arriving now has used up its request timeout."""
        return asyncio.get_running_loop().time() + self.request_timeout_s

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Defaults overridden by every `VISIONSERVE_<FIELD>` that is set (e.g. VISIONSERVE_MAX_BATCH_SIZE=32)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            variable = ENV_PREFIX + field.name.upper()
            raw = environ.get(variable)
            if raw is None or raw.strip() == "":
                continue
            kind = type(field.default)  # str, int, float or bool: every field has a default of its type
            try:
                values[field.name] = _parse_bool(raw) if kind is bool else kind(raw.strip())
            except ValueError:
                raise SettingsError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
        return cls(**values)


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)  # bool("false") would be True
