"""A no-op BentoML service taking the same upload as /classify: the framework's floor for the load benchmark.

`bentoml serve benchmarks.noop_service:NoopClassifier`: the same server settings and Starlette mount as
service.service (one worker), the multipart body read and parsed, no decode and no model; it answers a fixed
prediction of the same shape as /classify's default answer (top 5). BentoML's defaults otherwise, unless
VISIONSERVE_NOOP_SERVICE_SETTINGS=1 applies the service's own settings of the framework too: its BentoML
configuration defaults (service/bentoml_config.py: no access log, the prediction routes untraced) and its
garbage-collector settings (service/gc_settings.py).
"""

from __future__ import annotations

import os

import bentoml
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import bentoml_config, gc_settings

FIXED_ANSWER = {
    "model": "noop",
    "version": "0",
    "predictions": [{"label": f"class-{i}", "index": i, "probability": 0.2} for i in range(5)],
}


async def classify(request: Request) -> JSONResponse:
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        return JSONResponse({"error": "send the image in the multipart field 'image'"}, status_code=400)
    await upload.read()
    return JSONResponse(FIXED_ANSWER)


app = Starlette(routes=[Route("/classify", classify, methods=["POST"])])
SERVICE_SETTINGS = os.environ.get("VISIONSERVE_NOOP_SERVICE_SETTINGS") == "1"


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="visionserve-noop",
    workers=int(os.environ.get("VISIONSERVE_WORKERS", "1")),
    **(bentoml_config.SERVICE_DEFAULTS if SERVICE_SETTINGS else {}),
)
class NoopClassifier:
    @bentoml.on_startup
    def settle_garbage_collector(self) -> None:
        # The garbage-collector settings that the real service applies once warmed up.
        if SERVICE_SETTINGS:
            gc_settings.settle()
