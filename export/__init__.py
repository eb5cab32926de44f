"""The export stage: a training run -> a verified model package (ONNX, int8 ONNX, TorchScript, manifest)."""

# inference's own defaults (ONNX Runtime's telemetry off) must be set before any export module imports onnxruntime.
import inference  # noqa: F401
