"""TorchScript export of the serving module, with the spec and input contract as extra files inside the archive."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from export.wrapper import ServingModule

METADATA_FILE = "visionserve.json"  # the extra file inside model.ts


def export_torchscript(module: ServingModule, path: Path, metadata: dict[str, Any]) -> None:
    """Trace `module` (our models have no data-dependent control flow) and save it with `metadata` inside."""
    height, width = module.input_size
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        # torch 2.14 deprecates TorchScript in favour of torch.export; the package format still ships it
        # for torch-only consumers, and the parity gate checks that the traced module matches eager.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing records each convolution's cuDNN flags in the graph: with TF32 allowed (torch's default), the
        # module would run TF32 on a GPU whatever the caller sets, up to 5e-4 from float32 on an H100.
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(metadata, sort_keys=True)})


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The traced module (eval mode, CPU) and the metadata saved inside it."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[METADATA_FILE])
