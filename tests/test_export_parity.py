"""The parity gate's judgement on known figures: fp32 and int8 limits, accuracy loss, batch handling."""

from __future__ import annotations

import numpy as np
import pytest

from export.parity import GateThresholds, check_format, compare, predict_in_batches

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (100, 4, 4, 3), dtype=np.uint8)
LABELS = np.arange(100) % 3
# A confident reference: the right class of every image at probability 0.9.
REFERENCE = np.full((100, 3), 0.05, dtype=np.float32)
REFERENCE[np.arange(100), LABELS] = 0.9


def lookup(outputs: np.ndarray):
    """A predictor returning `outputs` for each image, identified by its position in IMAGES."""
    index = {image.tobytes(): i for i, image in enumerate(IMAGES)}

    def predict(pixels: np.ndarray) -> np.ndarray:
        return outputs[[index[p.tobytes()] for p in pixels]]

    return predict


def flipped(count: int) -> np.ndarray:
    """REFERENCE with the top class of the first `count` images moved to the next class."""
    outputs = REFERENCE.copy()
    outputs[:count] = np.roll(outputs[:count], 1, axis=1)
    return outputs


def judge(
    outputs: np.ndarray,
    precision: str,
    thresholds: GateThresholds | None = None,
    reference_accuracy=1.0,
):
    return check_format(
        "candidate",
        precision,
        {"cpu": lookup(outputs)},
        REFERENCE,
        IMAGES,
        (1, 7),
        IMAGES,
        LABELS,
        reference_accuracy,
        thresholds or GateThresholds(),
    )


def test_identical_outputs_pass_at_every_batch_size():
    report = judge(REFERENCE, "fp32")
    assert report.passed
    assert [(p.batch_size, p.max_abs_diff, p.top1_agreement) for p in report.parity] == [
        (1, 0.0, 1.0),
        (7, 0.0, 1.0),
    ]
    assert report.test_accuracy == 1.0


@pytest.mark.parametrize("shift, passes", [(0.9e-4, True), (1.1e-4, False)])
def test_fp32_probability_tolerance_is_1e_4(shift, passes):
    outputs = REFERENCE.copy()
    outputs[3, 0] += shift
    report = judge(outputs, "fp32")
    assert report.passed is passes
    assert report.parity[0].max_abs_diff == pytest.approx(shift, rel=1e-2)


def test_fp32_needs_every_top1_class_to_agree():
    report = judge(flipped(1), "fp32", GateThresholds(fp32_max_abs_diff=1.0))
    assert not report.passed
    assert report.parity[0].top1_agreement == 0.99
    assert any("top-1 agreement 99.00%" in f for f in report.failures)


@pytest.mark.parametrize("flips, passes", [(1, True), (2, False)])
def test_int8_needs_99_percent_top1_agreement(flips, passes):
    report = judge(flipped(flips), "int8", reference_accuracy=0.99)
    assert report.passed is passes


def test_int8_may_lose_at_most_one_point_of_test_accuracy():
    # One flip costs exactly 1 point against a perfect reference: allowed; with a half-point limit it fails.
    assert judge(flipped(1), "int8", reference_accuracy=1.0).passed
    report = judge(flipped(1), "int8", GateThresholds(int8_max_accuracy_drop=0.005), reference_accuracy=1.0)
    assert not report.passed
    assert any("test accuracy 0.9900" in f for f in report.failures)


def test_predict_in_batches_covers_every_image_once_with_a_short_last_batch():
    seen = []

    def predict(pixels):
        seen.append(len(pixels))
        return lookup(REFERENCE)(pixels)

    out = predict_in_batches(predict, IMAGES, 7)
    assert seen == [7] * 14 + [2]
    np.testing.assert_array_equal(out, REFERENCE)


def test_compare_refuses_a_wrong_output_shape():
    with pytest.raises(ValueError, match="output shape"):
        compare(REFERENCE, REFERENCE[:, :2], "cpu", 1)


def test_quantisation_keeps_the_input_stage_the_first_conv_the_head_and_softmax_in_float():
    from onnx import TensorProto, helper

    from export.quantize import float_nodes

    nodes = [
        helper.make_node("Transpose", ["pixels"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["nchw"], ["x"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["scaled"], name="normalise_scale"),
        helper.make_node("Conv", ["scaled", "w"], ["features"], name="conv"),
        helper.make_node("Conv", ["features", "w"], ["deeper"], name="second_conv"),
        helper.make_node("Mul", ["deeper", "scale"], ["later"], name="later_mul"),
        helper.make_node("Gemm", ["later", "w1"], ["hidden"], name="hidden_layer"),
        helper.make_node("Gemm", ["hidden", "w2"], ["logits"], name="head"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 4, 4, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
    )
    names = float_nodes(helper.make_model(graph))
    assert names == ["to_nchw", "to_float", "normalise_scale", "conv", "head", "softmax"]
