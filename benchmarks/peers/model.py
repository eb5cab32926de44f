"""What every peer server runs: the package's ONNX file in the service's own runtime settings, the shared decode and
the /classify answer, so that the servers differ and the model code does not."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from inference.imaging import decode_image
from inference.package import load_package
from inference.runtime import Predictor

TOP_K = 5


class PeerModel:
    def __init__(self, package_root: str | Path, threads: int) -> None:
        self.predictor = Predictor(load_package(package_root), backend="onnx", device="cpu", intra_op_threads=threads)
        self.spec = self.predictor.spec
        self.predictor.warm_up()

    @classmethod
    def from_env(cls) -> PeerModel:
        """The package and threads benchmarks/peer_comparison.py hands every peer process."""
        return cls(os.environ["PEER_PACKAGE"], int(os.environ["PEER_THREADS"]))

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.spec.input_size)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        return self.predictor.predict(pixels)

    def answer(self, probabilities: np.ndarray) -> dict:
        """/classify's answer for one image: the top 5 labels with their probabilities."""
        top = np.argsort(-probabilities)[:TOP_K]
        return {
            "predictions": [
                {"label": self.spec.class_names[i], "index": int(i), "probability": float(probabilities[i])}
                for i in top
            ]
        }
