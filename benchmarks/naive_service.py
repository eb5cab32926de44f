"""The naive baseline for the load benchmark: the same model in eager PyTorch, one model call per request.

`VISIONSERVE_NAIVE_RUN=RUN_DIR bentoml serve benchmarks.naive_service:NaiveClassifier`: no batching and no ONNX
Runtime; each request decodes its image (the shared decode_image) and calls the eager module on a batch of one
in Starlette's thread pool, as a first BentoML deployment typically would. Same upload and answer as /classify.
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export.wrapper import serving_module
from inference.imaging import ImageDecodeError, decode_image
from inference.runtime import cpu_threads
from training.checkpoint import load_checkpoint

TOP_K = 5


class EagerModel:
    """A checkpoint's model wrapped with the package's preprocessing: (1, H, W, 3) uint8 -> (C,) probabilities."""

    def __init__(self, run: str) -> None:
        checkpoint = load_checkpoint(run)
        self.spec = checkpoint.spec
        self.module = serving_module(checkpoint.build_model(), checkpoint.spec)
        torch.set_num_threads(cpu_threads())

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            probabilities, _ = self.module(torch.from_numpy(pixels))
        return probabilities[0].numpy()


def create_app(model: EagerModel) -> Starlette:
    async def classify(request: Request) -> JSONResponse:
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"error": "send the image in the multipart field 'image'"}, status_code=400)
        data = await upload.read()
        try:
            pixels = await run_in_threadpool(decode_image, data, model.spec.input_size)
        except ImageDecodeError as exc:
            return JSONResponse({"error": str(exc), "code": exc.reason}, status_code=400)
        probabilities = await run_in_threadpool(model.predict, pixels[None])
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]
        predictions = [
            {
                "label": model.spec.class_names[i],
                "index": int(i),
                "probability": float(probabilities[i]),
            }
            for i in order
        ]
        return JSONResponse({"model": model.spec.arch, "version": "naive", "predictions": predictions})

    return Starlette(routes=[Route("/classify", classify, methods=["POST"])])


MODEL = EagerModel(os.environ.get("VISIONSERVE_NAIVE_RUN", "naive-run-not-set"))


@bentoml.asgi_app(create_app(MODEL), path="/")
@bentoml.service(name="visionserve-naive", workers=1)
class NaiveClassifier:
    pass
