"""The export stage: a training run -> a verified model package (ONNX, int8 ONNX, TorchScript, manifest)."""
