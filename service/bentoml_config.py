"""BentoML configuration defaults of the service: its per-request access log off, its prediction routes untraced.

Both run on the event loop for every request, where they take the time that parsing and answering need, and on a
compute-bound model the cores that the model needs. BentoML's tracer records a span per request even when no
exporter is configured (its sampler records at sample rate 0, for the request ids in its logs), and each
access-log line is formatted in the worker and forwarded through the `bentoml serve` process. A 5-round probe on
2 cores (ResNet-18, 32 clients, not committed; benchmarks/results/service_load.md has the load test): 75.0% of
the raw engine's images/s with both on, 82.8% with the access log off, 88.2% with the prediction routes
untraced as well.

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
