"""LitServe with its dynamic batching.

PEER_PACKAGE=PKG PEER_THREADS=2 PEER_PORT=8000 python -m benchmarks.peers.litserve_app
"""

from __future__ import annotations

import os

import litserve as ls
import numpy as np

from benchmarks.peers.model import PeerModel

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.005


class ClassifierAPI(ls.LitAPI):
    def setup(self, device) -> None:
        self.model = PeerModel.from_env()

    def decode_request(self, request) -> np.ndarray:
        return self.model.decode(request["image"].file.read())

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.run(pixels)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return self.model.answer(output)


if __name__ == "__main__":
    api = ClassifierAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), generate_client_file=False)
