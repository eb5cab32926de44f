"""Building a Bento from a bentofile into a given BentoML home, and an interpreter that sees only what it installs.

Both serve to test what ships: a Bento served by an interpreter with the project installed in editable mode can
import a module the Bento lacks from the checkout, and so hides it.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENTOFILES = {"gpu": REPO / "bentofile.yaml", "cpu": REPO / "bentofile-cpu.yaml"}
MODEL_NAME = "visionserve-classifier"  # the model tag both bentofiles pack by default
# The project's own entries in site-packages: its metadata and the editable install's hook.
PROJECT_ENTRIES = ("visionserve-", "visionserve.", "__editable__")


class BuildError(Exception):
    """`bentoml build` or the model registration failed; the message holds the tool's output."""


def bentoml_env(home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}


def register_model(package: Path, home: Path) -> str:
    """Copy the package into `home`'s model store (as `make export` does) and return its tag."""
    code = "import sys; from pathlib import Path; from export.model_store import register_package; "
    code += "print(register_package(Path(sys.argv[1])))"
    return _run([sys.executable, "-c", code, str(package)], home).splitlines()[-1]


def build_bento(bentofile: Path, home: Path, models: str = f"{MODEL_NAME}:latest") -> str:
    """`bentoml build -f bentofile` from the repository root into `home`'s store, packing the model-store tags
    `models` names (VISIONSERVE_MODEL's form: comma-separated); returns the Bento's tag."""
    command = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "-o", "tag", str(REPO)]
    output = _run(command, home, {"VISIONSERVE_MODEL": models, "VISIONSERVE_REPOSITORY": ""})
    # `-o tag` prints `__tag__:name:version` as its last line.
    return output.strip().splitlines()[-1].removeprefix("__tag__:")


def isolated_python(folder: Path) -> Path:
    """A virtual environment at `folder` with this interpreter's installed packages but not the project.

    Every entry of this environment's site-packages is linked into the new one, except the project's own: its
    distribution metadata and the editable install's hook (a `.pth` file and its finder), which would make the
    checkout importable and `importlib.metadata` find a version that no Bento has.
    """
    venv.EnvBuilder(with_pip=False).create(folder)
    python = folder / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for site_packages in map(Path, site.getsitepackages()):
        for entry in site_packages.iterdir():
            if entry.name.startswith(PROJECT_ENTRIES) or (purelib / entry.name).exists():
                continue
            (purelib / entry.name).symlink_to(entry)
    return python


def _run(command: list, home: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(command, cwd=REPO, env={**bentoml_env(home), **(env or {})}, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(
            f"{' '.join(map(str, command[:4]))} failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result.stdout
