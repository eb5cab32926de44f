"""Random-weight runs and model packages, for the benchmarks whose figures do not depend on what a model learnt
(throughput, overhead): any registered architecture, without training it first."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_run(
    folder: Path, arch: str, classes: Sequence[str], data: str, input_size: tuple[int, int] | None = None
) -> Path:
    """A run folder holding a checkpoint of `arch` with seeded random weights, as training would write it (at the
    registry's input size unless `input_size` is given)."""
    import torch  # here, not at the top: the load generator imports this module and must stay light

    from training.checkpoint import Checkpoint, save_checkpoint
    from training.models import build_model, model_spec

    torch.manual_seed(0)
    spec = model_spec(arch, classes, input_size)
    model = build_model(arch, spec.num_classes, spec.input_size)
    config = {"data": data, "note": "random weights for a benchmark; never trained"}
    save_checkpoint(folder / "checkpoint.pt", Checkpoint(spec, model.state_dict(), config=config, epoch=0))
    return folder


def random_package(
    cache: Path,
    arch: str,
    classes: Sequence[str],
    data: Path,
    *export_options: str,
    input_size: tuple[int, int] | None = None,
) -> tuple[Path, Path]:
    """(package, run) of a random-weight `arch`, exported to ONNX by `python -m export` (its parity gate
    evaluated on `data`, with `export_options` added); built once under `cache` and reused after."""
    name = arch if input_size is None else f"{arch}-{input_size[0]}x{input_size[1]}"
    run, package = cache / "runs" / name, cache / "packages" / name
    if (package / "manifest.json").is_file() and (run / "checkpoint.pt").is_file():
        return package, run
    random_run(run, arch, classes, str(data), input_size)
    command = [
        sys.executable, "-m", "export", "--run", str(run), "--out", str(package), "--formats", "onnx",
        "--name", f"random-{arch.replace('_', '-')}", "--version", "1", "--no-bentoml", "--overwrite",
        *export_options,
    ]  # fmt: skip
    print(f"building a random-weight {arch} package: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return package, run
