"""The service's own Prometheus series, shown beside BentoML's at /metrics.

Created on first use, not at import: BentoML workers set PROMETHEUS_MULTIPROC_DIR after importing the service
module, and prometheus_client must see it before its first metric exists to write to the shared files that
BentoML's /metrics reads. In a plain process (unit tests) they land in the default registry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Seconds: from half a millisecond (an idle queue) to the default request timeout.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


MODEL_LABELS = ("model", "version")  # every per-model series: the model's name and the version that served


@dataclass(frozen=True)
class ModelMetrics:
    """The batching series of one model version (children of ServiceMetrics' histograms with its labels)."""

    queue_wait_seconds: object
    batch_size: object
    inference_seconds: object


@dataclass(frozen=True)
class ServiceMetrics:
    queue_wait_seconds: object  # Histogram by model, version: arrival in the batcher's queue -> taken into a batch
    batch_size: object  # Histogram by model, version: images per model call
    inference_seconds: object  # Histogram by model, version: one model call (a whole batch)
    rejected_requests: object  # Counter, label reason = ApiError.code
    runtime: object  # Gauge = 1 by model, version: the backend, provider and device in use, and whether CUDA fell back
    model_loaded: object  # Gauge by model, version: 1 while the version takes requests, 0 once unloaded
    model_memory_bytes: object  # Gauge by model, version: the worker's RSS growth while the version loaded
    model_loads: object  # Counter by model, outcome (loaded | refused): loads after start-up (route or polling)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(
            self.queue_wait_seconds.labels(model, version),
            self.batch_size.labels(model, version),
            self.inference_seconds.labels(model, version),
        )

    def set_runtime(
        self, model: str, version: str, backend: str, provider: str, device: str, requested_device: str, fallback: bool
    ) -> None:
        self.runtime.labels(
            model=model,
            version=version,
            backend=backend,
            provider=provider,
            device=device,
            requested_device=requested_device,
            cuda_fallback=str(fallback).lower(),
        ).set(1)


@functools.cache
def service_metrics() -> ServiceMetrics:
    # Imported here, not at module import: see the module docstring.
    from prometheus_client import Counter, Gauge, Histogram

    return ServiceMetrics(
        queue_wait_seconds=Histogram(
            "visionserve_queue_wait_seconds",
            "Time a request's images waited in the batching queue before their batch started",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
        ),
        batch_size=Histogram(
            "visionserve_batch_size",
            "Images per model call (adaptive batching)",
            MODEL_LABELS,
            buckets=BATCH_SIZE_BUCKETS,
        ),
        inference_seconds=Histogram(
            "visionserve_inference_seconds",
            "Duration of one model call on a whole batch",
            MODEL_LABELS,
            buckets=LATENCY_BUCKETS,
        ),
        rejected_requests=Counter(
            "visionserve_rejected_requests",
            "Requests answered with an error, by reason",
            ["reason"],
        ),
        runtime=Gauge(
            "visionserve_runtime_info",
            "1 for the runtime in use: backend, execution provider, device, and whether CUDA fell back to the CPU",
            [*MODEL_LABELS, "backend", "provider", "device", "requested_device", "cuda_fallback"],
            multiprocess_mode="livemax",  # one series per label set, not one per worker pid
        ),
        model_loaded=Gauge(
            "visionserve_model_loaded",
            "1 while the model version takes requests in a worker, 0 once it is unloaded",
            MODEL_LABELS,
            multiprocess_mode="livemax",
        ),
        model_memory_bytes=Gauge(
            "visionserve_model_memory_bytes",
            "Growth of the worker's resident memory while the model version loaded and warmed up (the largest worker's)",
            MODEL_LABELS,
            multiprocess_mode="livemax",
        ),
        model_loads=Counter(
            "visionserve_model_loads",
            "Model versions loaded after start-up (load route or polling), by outcome: loaded or refused",
            ["model", "outcome"],
        ),
    )
