"""A tiny torch-free model package for service and batch tests: it classifies an image by its dominant colour.

The ONNX graph follows the real export contract (uint8 (N, H, W, 3) `pixels` in, float32 `probabilities` and `logits`
out), so tests can send distinct images with known labels (pure red -> "red") and check that results never cross.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inference.package import (
    BACKEND_FILES,
    INPUT_NAME,
    MANIFEST_NAME,
    OUTPUT_LOGITS,
    OUTPUT_PROBABILITIES,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    sha256_file,
)
from inference.spec import ModelSpec

COLOR_CLASSES = ("red", "green", "blue")


def color_pixels(label: str, size: tuple[int, int] = (32, 32), batch: int = 1) -> np.ndarray:
    """(batch, H, W, 3) uint8 of one pure colour: the colour package classifies it as `label`."""
    pixels = np.zeros((batch, *size, 3), dtype=np.uint8)
    pixels[..., COLOR_CLASSES.index(label)] = 255
    return pixels


def color_model(input_size: tuple[int, int]) -> onnx.ModelProto:
    weights = numpy_helper.from_array((np.eye(3) * 8.0).astype(np.float32), "weights")
    scale = numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale")
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["as_float", "scale"], ["unit"]),
        helper.make_node("ReduceMean", ["unit"], ["channel_means"], axes=[1, 2], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["channel_means", "weights"], [OUTPUT_LOGITS]),
        helper.make_node("Softmax", [OUTPUT_LOGITS], [OUTPUT_PROBABILITIES], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", *input_size, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["N", 3]),
        ],
        initializer=[weights, scale],
    )
    # IR version 10 (ONNX 1.16): newer onnx releases write IR versions that onnxruntime may not read yet.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def make_color_package(
    root: Path, input_size: tuple[int, int] = (32, 32), name: str = "color", version: str = "1"
) -> Path:
    """Write a complete, verifiable package folder at `root` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    onnx_name = BACKEND_FILES["onnx"]
    onnx.save(color_model(input_size), str(root / onnx_name))
    spec = ModelSpec(arch="color", class_names=COLOR_CLASSES, input_size=input_size, mean=(0.0,) * 3, std=(1.0,) * 3)
    manifest = {
        "format": PACKAGE_FORMAT,
        "format_version": PACKAGE_FORMAT_VERSION,
        "name": name,
        "version": version,
        "spec": spec.to_dict(),
        "files": {
            onnx_name: {
                "sha256": sha256_file(root / onnx_name),
                "bytes": (root / onnx_name).stat().st_size,
                "backend": "onnx",
                "precision": "fp32",
            }
        },
        "created_at": datetime.now(timezone.utc).isoformat(),
        "metrics": {},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return root


def cuda_session_works() -> bool:
    """Whether ONNX Runtime really gets the CUDA provider here (it is listed as available even without a GPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    model = color_model((4, 4)).SerializeToString()
    session = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    return session.get_providers()[0] == "CUDAExecutionProvider"
