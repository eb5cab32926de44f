"""What ships: each bentofile's Bento, built into a fresh BentoML home and served by an interpreter that cannot import
the checkout, classifies an image. A bentofile that leaves out a module the service imports fails here. The CPU
Bento is built with two models and serves both without being told which."""

from __future__ import annotations

import io
import subprocess

import httpx
import pytest
import yaml
from PIL import Image

from benchmarks.servers import BentoServer
from deploy.bento import BENTOFILES, MODEL_NAME, build_bento, isolated_python, register_model
from tests.support.color_package import make_color_package

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


SECOND_MODEL = "visionserve-transfer"
# The model-store tags each Bento is built with: the default one, and two models side by side.
BUILT_WITH = {"gpu": f"{MODEL_NAME}:latest", "cpu": f"{MODEL_NAME}:latest,{SECOND_MODEL}:latest"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A BentoML home holding the colour package under the model name the bentofiles pack, and a second model."""
    root = tmp_path_factory.mktemp("bento")
    home = root / "bentoml"
    register_model(make_color_package(root / "package", name=MODEL_NAME), home)
    register_model(make_color_package(root / "second", input_size=(48, 48), name=SECOND_MODEL, version="7"), home)
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
    tag = build_bento(BENTOFILES[image], store, BUILT_WITH[image])
    assert tag.startswith(("visionserve:", "visionserve-cpu:"))
    # No VISIONSERVE_MODEL: the Bento serves the models it was built with.
    env = {"BENTOML_HOME": str(store), "BENTOML_DO_NOT_TRACK": "True"}
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 230)).save(buffer, "JPEG", quality=90)
    image_file = {"image": ("blue.jpg", buffer.getvalue(), "image/jpeg")}
    models = [reference.split(":")[0] for reference in BUILT_WITH[image].split(",")]
    # cwd outside the checkout: nothing of the project on the path but the Bento's own src/.
    with BentoServer(tag, env, log_dir=tmp_path, python=python, cwd=tmp_path) as server:
        answers = {
            model: httpx.post(f"{server.url}/classify", params={"model": model}, files=image_file) for model in models
        }
        served = httpx.get(f"{server.url}/metadata").json()["models"]
        server_metadata = httpx.get(f"{server.url}/v2")
        schema = httpx.get(f"{server.url}/docs.json")
        log = server.log_tail()
    for model, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert (answer.json()["model"], answer.json()["predictions"][0]["label"]) == (model, "blue")
    assert sorted(entry["name"] for entry in served) == sorted(models)
    assert server_metadata.status_code == 200 and server_metadata.json()["version"]
    assert schema.status_code == 200 and "/classify" in schema.json()["paths"]
    assert "No module named" not in log


def test_the_bento_packs_every_model_it_was_built_with(store):
    tag = build_bento(BENTOFILES["cpu"], store, BUILT_WITH["cpu"])
    bento = store / "bentos" / tag.replace(":", "/")
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    # BentoML 1.4 lists a service's models under it, and copies them in when it exports or containerizes the Bento.
    packed = sorted(model["tag"] for service in info["services"] for model in service["models"])
    assert packed == [f"{MODEL_NAME}:1", f"{SECOND_MODEL}:7"]
    assert {"name": "VISIONSERVE_MODEL", "value": BUILT_WITH["cpu"]} in [
        {"name": entry["name"], "value": entry["value"]} for entry in info["envs"]
    ]
