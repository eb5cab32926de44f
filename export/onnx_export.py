"""ONNX export of the serving module: fp32, dynamic batch, metadata (spec, input contract) inside the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import torch

from export.wrapper import ServingModule
from inference.package import INPUT_NAME, OUTPUT_LOGITS, OUTPUT_PROBABILITIES

DEFAULT_OPSET = 18
METADATA_PREFIX = "visionserve."


def export_onnx(module: ServingModule, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write `module` as an ONNX graph taking uint8 (N, H, W, 3) `pixels` with N dynamic.

    Uses the torch.export-based exporter (the default and maintained one since torch 2.9; the
    TorchScript-based one is deprecated), with weights inside the file (our models are far below 2 GB).
    """
    height, width = module.input_size
    # Batch 2 as the example: torch.export specialises a dimension that it sees as 0 or 1.
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_PROBABILITIES, OUTPUT_LOGITS],
        dynamic_shapes={"pixels": {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def embed_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Store `metadata` (JSON-encoded values) in the file's metadata_props, under `visionserve.<key>`."""
    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in metadata.items():
        model.metadata_props.add(key=METADATA_PREFIX + key, value=json.dumps(value, sort_keys=True))
    onnx.save(model, str(path))


def read_metadata(path: Path) -> dict[str, Any]:
    """The `visionserve.*` metadata of an ONNX file, JSON-decoded, without loading its weights."""
    model = onnx.load(str(path), load_external_data=False)
    return {
        p.key.removeprefix(METADATA_PREFIX): json.loads(p.value)
        for p in model.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def opset_of(path: Path) -> int:
    """The default-domain opset version the file really uses (the exporter may not honour the one asked for)."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_onnx(path: Path) -> None:
    """onnx.checker with full shape inference; raises onnx.checker.ValidationError on a malformed graph."""
    onnx.checker.check_model(str(path), full_check=True)
