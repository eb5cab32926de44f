"""Static int8 (QDQ) quantisation of the fp32 ONNX graph, calibrated on training images.

Dynamic quantisation of convolutions was about 10x slower on these CPUs, so only static QDQ is offered.
Weights are int8 per output channel, activations uint8 (the u8s8 pair that ONNX Runtime's x86 kernels
favour; int8 activations measured no faster). Three parts stay in float32:
- the input stage (uint8 pixels -> NCHW -> (x - mean) / std) and the first convolution: quantised, the
  broadcast Mul/Add ran as QLinearMul/QLinearAdd and took 45% of the lesson CNN's int8 time; with only the
  convolution quantised, ONNX Runtime moved the normalisation after the layout change, where broadcasting
  over the 3 innermost channels took 26%, and the convolution's 3 input channels (a 27-deep product) ran
  3.6x slower in int8 than in float. Kept in float, and with ONNX Runtime's QDQ propagation off (see
  inference/runtime.py), the lesson CNN's int8 graph runs 1.33-1.50x faster than its float one at batch 1
  to 64 instead of 0.85-0.93x (benchmarks/results/export_formats.md); the first convolution is ~0.3% of
  ResNet-18's work;
- the classifier head (the last Gemm/MatMul): quantised, it cost most of the top-1 agreement lost on
  a briefly trained lesson CNN (98.8% -> 99.3% with it in float, 3,000 CIFAR-10 test images) for
  about 2% of the run time;
- the softmax: probabilities quantised to 8 bits would move by up to 1/255.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from inference.package import INPUT_NAME

CALIBRATION_BATCH = 32
FIRST_COMPUTE_OPS = ("Conv", "Gemm", "MatMul")  # the float input stage ends with the first of these
HEAD_OPS = ("Gemm", "MatMul")  # the last of these is the classifier head
FLOAT_OPS = ("Softmax",)


class PixelBatches(CalibrationDataReader):
    """Feeds uint8 (B, H, W, 3) batches of calibration images to the quantiser."""

    def __init__(self, images: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_images: np.ndarray) -> None:
    """Write the static int8 QDQ version of `fp32_path`, calibrated (min/max) on uint8 (N, H, W, 3) images."""
    if len(calibration_images) == 0:
        raise ValueError("int8 quantisation needs at least one calibration image")
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        # Shape inference and graph optimisation first, as ONNX Runtime recommends before quantising.
        # ONNX's own shape inference suffices for these static-shape CNNs; ONNX Runtime's symbolic one
        # crashes on the Reshape of the airbench net's exported graph.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(int8_path),
            PixelBatches(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=float_nodes(onnx.load(str(prepared))),
        )


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes to keep in float32: the input stage (every node fed, directly or not, by the
    pixels, up to and including the first convolution or matrix product), the classifier head and every
    softmax."""
    names, fed_by_pixels = [], {INPUT_NAME}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if not fed_by_pixels.intersection(node.input):
            continue
        names.append(node.name)
        if node.op_type in FIRST_COMPUTE_OPS:
            break
        fed_by_pixels.update(node.output)
    heads = [node.name for node in model.graph.node if node.op_type in HEAD_OPS][-1:]
    return names + heads + [node.name for node in model.graph.node if node.op_type in FLOAT_OPS]
