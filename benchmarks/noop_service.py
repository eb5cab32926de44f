"""A no-op BentoML service taking the same upload as /classify: the framework's floor for the load benchmark.

`bentoml serve benchmarks.noop_service:NoopClassifier`: the same server settings and Starlette mount as
service.service (one worker), the multipart body read and parsed, no decode and no model; it answers a fixed
prediction of the same shape as /classify's default answer (top 5). BentoML's defaults otherwise, unless
VISIONSERVE_NOOP_GC_SETTINGS=1 applies the service's garbage-collector settings too.
"""

from __future__ import annotations

import os

import bentoml
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from service import gc_settings

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


@bentoml.asgi_app(app, path="/")
@bentoml.service(name="visionserve-noop", workers=int(os.environ.get("VISIONSERVE_WORKERS", "1")))
class NoopClassifier:
    @bentoml.on_startup
    def settle_garbage_collector(self) -> None:
        # With VISIONSERVE_NOOP_GC_SETTINGS=1, the garbage-collector settings that the real service applies once
        # warmed up: the framework's floor with them, for the load test.
        if os.environ.get("VISIONSERVE_NOOP_GC_SETTINGS") == "1":
            gc_settings.settle()
