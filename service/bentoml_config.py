"""BentoML configuration defaults of the service: its per-request access log off, its prediction routes untraced.

Both run on the event loop for every request, where they take the time that parsing and answering need, and on a
compute-bound model the cores that the model needs. BentoML's tracer records a span per request even when no
exporter is configured (its sampler records at sample rate 0, for the request ids in its logs), and each
access-log line is formatted in the worker and forwarded through the `bentoml serve` process. With both on, the
ResNet-18 server's event loop spent 1.09 ms of CPU per request, with both off 0.57 ms (a side-by-side probe, 5
rounds, 2 cores, 32 clients, not committed); benchmarks/results/service_cpu.md measures the no-op endpoint with
BentoML's defaults and with the service's settings, service_load.md the throughput.

These are defaults of the service's configuration, so BentoML's own configuration overrides them, e.g.
BENTOML_CONFIG_OPTIONS='services.visionserve.logging.access.enabled=true
services.visionserve.tracing.excluded_urls=[]' (README, "Access log and tracing").
"""

from __future__ import annotations

# Regular expressions searched in each request's URL (OpenTelemetry's excluded_urls); the other routes
# (/metadata, /v2 metadata, health, /metrics) keep their spans.
PREDICTION_ROUTES = ["/classify$", "/classify_batch$", "/v2/models/[^/]+/infer$"]

SERVICE_DEFAULTS = {
    "logging": {"access": {"enabled": False}},
    "tracing": {"excluded_urls": PREDICTION_ROUTES},
}
