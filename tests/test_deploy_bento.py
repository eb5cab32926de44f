"""What ships: each bentofile's Bento, built into a fresh BentoML home and served by an interpreter that cannot import
the checkout, classifies an image. A bentofile that leaves out a module the service imports fails here."""

from __future__ import annotations

import io
import subprocess

import httpx
import pytest
from PIL import Image

from benchmarks.servers import BentoServer
from deploy.bento import BENTOFILES, MODEL_NAME, build_bento, isolated_python, register_model
from tests.support.color_package import make_color_package

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A BentoML home holding the colour package under the model name the bentofiles pack."""
    root = tmp_path_factory.mktemp("bento")
    home = root / "bentoml"
    register_model(make_color_package(root / "package", name=MODEL_NAME), home)
    return home


@pytest.fixture(scope="module")
def python(tmp_path_factory):
    return isolated_python(tmp_path_factory.mktemp("isolated") / "venv")


def test_the_isolated_interpreter_has_the_dependencies_but_not_the_project(python, tmp_path):
    probe = (
        "import importlib.metadata, bentoml, onnxruntime, PIL\n"
        "try:\n import service\nexcept ImportError:\n print('no code')\n"
        "try:\n importlib.metadata.version('visionserve')\nexcept importlib.metadata.PackageNotFoundError:\n"
        " print('no metadata')"
    )
    result = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env={})
    assert result.stdout.split() == ["no", "code", "no", "metadata"], result.stderr


@pytest.mark.parametrize("image", sorted(BENTOFILES))
def test_the_built_bento_serves_without_the_checkout(image, store, python, tmp_path):
    tag = build_bento(BENTOFILES[image], store)
    assert tag.startswith(("visionserve:", "visionserve-cpu:"))
    env = {"BENTOML_HOME": str(store), "BENTOML_DO_NOT_TRACK": "True", "VISIONSERVE_MODEL": f"{MODEL_NAME}:latest"}
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 230)).save(buffer, "JPEG", quality=90)
    # cwd outside the checkout: nothing of the project on the path but the Bento's own src/.
    with BentoServer(tag, env, log_dir=tmp_path, python=python, cwd=tmp_path) as server:
        answer = httpx.post(f"{server.url}/classify", files={"image": ("blue.jpg", buffer.getvalue(), "image/jpeg")})
        server_metadata = httpx.get(f"{server.url}/v2")
        schema = httpx.get(f"{server.url}/docs.json")
        log = server.log_tail()
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"] == "blue"
    assert server_metadata.status_code == 200 and server_metadata.json()["version"]
    assert schema.status_code == 200 and "/classify" in schema.json()["paths"]
    assert "No module named" not in log
