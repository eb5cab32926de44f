"""Ray Serve as its users tune it: one replica whose requests join batches through `@serve.batch`.

PEER_PACKAGE=PKG PEER_THREADS=2 PEER_PORT=8000 python -m benchmarks.peers.rayserve_app
"""

from __future__ import annotations

import os
import threading

import numpy as np
import ray
from ray import serve
from starlette.requests import Request

from benchmarks.peers.model import PeerModel

MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.005


@serve.deployment(max_ongoing_requests=512)
class Classifier:
    def __init__(self) -> None:
        self.model = PeerModel.from_env()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def run_batch(self, images: list[np.ndarray]) -> list[dict]:
        probabilities = self.model.run(np.stack(images))
        return [self.model.answer(row) for row in probabilities]

    async def __call__(self, request: Request) -> dict:
        form = await request.form()
        return await self.run_batch(self.model.decode(await form["image"].read()))


if __name__ == "__main__":
    ray.init(include_dashboard=False)  # its workers inherit this environment: PEER_PACKAGE, PEER_THREADS
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    serve.run(Classifier.bind(), route_prefix="/classify")
    threading.Event().wait()
