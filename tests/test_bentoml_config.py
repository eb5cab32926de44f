"""The service's BentoML configuration defaults: which routes go untraced, and that the service declares them.

That BentoML's own configuration overrides them on a running server: tests/test_service_http.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from opentelemetry.util.http import ExcludeList

from service.bentoml_config import PREDICTION_ROUTES, SERVICE_DEFAULTS
from tests.support.color_package import make_color_package
from tests.support.servers import REPO

# OpenTelemetry's ASGI middleware matches scheme://host + path, without the query string.
HOST = "http://127.0.0.1:3000"


@pytest.mark.parametrize("path", ["/classify", "/classify_batch", "/v2/models/visionserve-classifier/infer"])
def test_prediction_routes_are_not_traced(path):
    assert ExcludeList(PREDICTION_ROUTES).url_disabled(HOST + path)


@pytest.mark.parametrize(
    "path",
    [
        "/metadata",
        "/readyz",
        "/metrics",
        "/v2",
        "/v2/models/m",
        "/v2/models/m/ready",
        "/classify/more",
        "/v2/models/infer",
    ],
)
def test_other_routes_keep_their_spans(path):
    assert not ExcludeList(PREDICTION_ROUTES).url_disabled(HOST + path)


def test_the_service_declares_the_defaults(tmp_path):
    # In a subprocess: importing service.service verifies the package named by VISIONSERVE_MODEL.
    package = make_color_package(tmp_path / "color")
    script = "import json; from service.service import ImageClassifier; print(json.dumps(ImageClassifier.config))"
    env = {**os.environ, "VISIONSERVE_MODEL": str(package), "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout.strip().splitlines()[-1])
    assert config["logging"] == SERVICE_DEFAULTS["logging"] == {"access": {"enabled": False}}
    assert config["tracing"]["excluded_urls"] == PREDICTION_ROUTES
