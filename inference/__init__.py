"""The torch-free core shared by every stage: the model spec, image decoding, model packages and runtimes."""

import os

# ONNX Runtime's Linux builds record each process (host OS, executable path, a device id) for upload to Microsoft
# unless this is set before onnxruntime is first imported; a server, a batch job or a CI run should not, and a
# read-only container cannot write the queue. Set ORT_DISABLE_TELEMETRY=0 to allow it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
