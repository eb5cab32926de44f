"""TorchServe's custom handler for the comparison: a batch of multipart uploads through ONNX Runtime.

TorchServe's Java front end batches requests (batchSize, maxBatchDelay in its config) and hands each batch to a
Python worker, which calls `handle` with one dict per request (the form's fields by name).
"""

from __future__ import annotations

import numpy as np

from benchmarks.peers.model import PeerModel


class ClassifierHandler:
    def initialize(self, context) -> None:
        self.model = PeerModel.from_env()
        self.initialized = True

    def handle(self, data: list[dict], context) -> list[dict]:
        images = [self.model.decode(bytes(row.get("image") or row.get("data") or row.get("body"))) for row in data]
        probabilities = self.model.run(np.stack(images))
        return [self.model.answer(row) for row in probabilities]


_service = ClassifierHandler()


def handle(data, context):
    """TorchServe's module-level entry point: initialise once, then classify each batch."""
    if not getattr(_service, "initialized", False):
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
