"""The server a user would write first: FastAPI calling ONNX Runtime once per request, no batching.

PEER_PACKAGE=PKG PEER_THREADS=2 uvicorn benchmarks.peers.fastapi_app:app --loop uvloop --http httptools
"""

from __future__ import annotations

from fastapi import FastAPI, UploadFile
from starlette.concurrency import run_in_threadpool

from benchmarks.peers.model import PeerModel

model = PeerModel.from_env()
app = FastAPI()


@app.post("/classify")
async def classify(image: UploadFile) -> dict:
    pixels = model.decode(await image.read())
    probabilities = await run_in_threadpool(model.run, pixels[None])
    return model.answer(probabilities[0])
