"""BentoML configuration defaults of the service: its per-request access log off, its prediction routes untraced.

Both run on the event loop for every request (BentoML's tracer records a span even with no exporter configured,
and each access-log line is forwarded through the `bentoml serve` process), taking time from parsing and answering
and, on a compute-bound model, cores from the model. benchmarks/results/service_cpu.md measures the no-op endpoint
with BentoML's defaults and with these settings.

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
