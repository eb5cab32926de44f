"""Tests of several models in one service (service.repository_layout, service.repository, service.repository_routes):
the repository's layout and config, each model with its own Classifier and threads, the routes over every model,
and rollouts: a new version takes requests only once warm, admitted requests finish on the old one, and a bad
version is refused while the old one keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import onnx
import pytest
from onnx import helper
from prometheus_client import REGISTRY

from inference.imaging import encode_png
from inference.package import MANIFEST_NAME, sha256_file
from inference.runtime import Predictor
from service.auth import AccessControl, hash_key
from service.repository import ModelRepository
from service.repository_layout import (
    CONFIG_NAME,
    RepositoryError,
    RepositoryFolder,
    open_source,
    plan,
    version_order,
)
from service.settings import ServiceSettings, SettingsError
from tests.support.color_package import color_pixels, make_color_package
from tests.support.in_process import in_process_repository
from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "admin-key"
ADMIN = AccessControl(admin_keys=(bytes.fromhex(hash_key(ADMIN_KEY).removeprefix("sha256:")),))
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SETTINGS = {**SERVICE_TEST_SETTINGS, "VISIONSERVE_DEVICE": "cpu", "VISIONSERVE_THREADS": "2"}


def make_repository(root: Path, models: dict[str, list[str]], config: dict | None = None) -> Path:
    for name, versions in models.items():
        for version in versions:
            make_color_package(root / name / version, name=name, version=version)
    if config is not None:
        (root / CONFIG_NAME).write_text(json.dumps(config))
    return root


def settings_for(root: Path, **environ: str) -> ServiceSettings:
    return ServiceSettings.from_env({**SETTINGS, "VISIONSERVE_REPOSITORY": str(root), **environ})


def reseal(folder: Path) -> None:
    """Record model.onnx's current sha256 in the manifest (a package that verifies, whatever its graph)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def png(label: str) -> bytes:
    return encode_png(color_pixels(label)[0])


PNG = {"content-type": "image/png"}


# --- the layout, the config and the plan ---------------------------------------------------------------------------


def test_versions_compare_numerically_when_all_digits_else_lexically():
    assert version_order(["10", "9", "2"]) == ["2", "9", "10"]
    assert version_order(["2024-02", "2024-10", "2024-01"]) == ["2024-01", "2024-02", "2024-10"]
    assert version_order(["10", "9", "v2"]) == ["10", "9", "v2"]  # one non-digit: lexical for all


def test_every_model_is_planned_at_its_highest_version_with_its_share_of_the_threads(tmp_path):
    root = make_repository(tmp_path, {"a": ["1", "2", "10"], "b": ["1"]})
    planned = plan(RepositoryFolder(root), settings_for(root, VISIONSERVE_THREADS="4"))
    assert [(p.name, p.version) for p in planned] == [("a", "10"), ("b", "1")]
    assert [p.settings.threads_per_instance for p in planned] == [2, 2]  # 4 threads, 2 models


def test_the_config_sets_each_models_batching_threads_and_versions(tmp_path):
    config = {"models": {"a": {"max_batch_size": 4, "model_instances": 2, "threads": 3, "versions": ["1", "2"]}}}
    root = make_repository(tmp_path, {"a": ["1", "2", "3"], "b": ["1"]}, config)
    planned = {(p.name, p.version): p.settings for p in plan(RepositoryFolder(root), settings_for(root))}
    assert set(planned) == {("a", "1"), ("a", "2"), ("b", "1")}
    a, b = planned["a", "1"], planned["b", "1"]
    assert (a.max_batch_size, a.model_instances, a.threads_per_worker) == (4, 2, 3)
    assert (b.max_batch_size, b.model_instances, b.threads_per_worker) == (64, 1, 1)  # 2 threads, 2 models


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"modles": {}}, "unknown keys ['modles']"),
        ({"models": {"color": {"max_batch": 4}}}, "unknown keys ['max_batch']"),
        ({"models": {"color": {"max_batch_size": "4"}}}, "max_batch_size must be an integer"),
        ({"models": {"color": {"model_instances": True}}}, "model_instances must be an integer"),
        ({"models": {"color": {"max_queue": 0}}}, "max_queue must be >= 1"),
        ({"models": {"color": {"backend": "tensorrt"}}}, "backend 'tensorrt' is unknown"),
        ({"models": {"color": {"versions": []}}}, "at least one version"),
        ({"models": {"color": {"versions": ["../1"]}}}, "is not a valid name"),
        ({"models": {"color": {"versions": ["7"]}}}, "has no version '7'"),
        ({"models": {"color": {"max_queue": 4}}}, "MAX_BATCH_IMAGES (8) must not exceed"),
        ({"models": {"missing": {}}}, "names models with no folder"),
        ([1], "must be a JSON object"),
    ],
)
def test_a_bad_config_is_a_one_line_error(tmp_path, config, message):
    root = make_repository(tmp_path, {"color": ["1"]}, config)
    with pytest.raises(RepositoryError) as refused:
        plan(RepositoryFolder(root), settings_for(root))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_bad_repositories_are_refused_at_start(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="holds no models"):
        plan(RepositoryFolder(empty), settings_for(empty))
    with pytest.raises(RepositoryError, match="not a folder"):
        RepositoryFolder(tmp_path / "nowhere")
    bad_name = make_repository(tmp_path / "bad-name", {"color": ["1"]})
    (bad_name / "my model").mkdir()
    with pytest.raises(RepositoryError, match="'my model' is not a valid name"):
        plan(RepositoryFolder(bad_name), settings_for(bad_name))
    misnamed = make_repository(tmp_path / "misnamed", {"color": ["1"]})
    (misnamed / "color" / "1").rename(misnamed / "color" / "2")
    with pytest.raises(RepositoryError, match="manifest says model 'color' version '1'"):
        plan(RepositoryFolder(misnamed), settings_for(misnamed))
    tampered = make_repository(tmp_path / "tampered", {"color": ["1"]})
    with open(tampered / "color" / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepositoryError, match="fails its checksum"):
        plan(RepositoryFolder(tampered), settings_for(tampered))


def test_hidden_folders_are_ignored_and_a_link_out_of_the_repository_is_refused(tmp_path):
    root = make_repository(tmp_path / "repository", {"color": ["1"]})
    make_color_package(root / "color" / ".2.incoming", version="2")  # a copy in progress
    assert RepositoryFolder(root).versions("color") == ["1"]
    outside = make_color_package(tmp_path / "elsewhere", version="3")
    os.symlink(outside, root / "color" / "3")
    (root / "color" / "4").write_text("not a folder")
    source = RepositoryFolder(root)
    with pytest.raises(RepositoryError, match="outside the repository") as refused:
        source.package("color", "3", "onnx")
    assert refused.value.code == "invalid_model_name"


def test_repository_settings_are_checked():
    with pytest.raises(SettingsError, match="VISIONSERVE_REPOSITORY_POLL_S polls a repository"):
        ServiceSettings(repository_poll_s=5)
    with pytest.raises(SettingsError, match="VISIONSERVE_REPOSITORY_POLL_S must be >= 0"):
        ServiceSettings(repository="/x", repository_poll_s=-1)
    with pytest.raises(RepositoryError, match="is not a folder"):
        open_source(ServiceSettings(repository=str(REPO / "no-such-repository")))


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ({"models": {"color": {"colour": 1}}}, "model 'color' has unknown keys ['colour']"),
        (None, "holds no models"),
    ],
)
def test_serve_exits_with_one_line_for_a_bad_repository(tmp_path, setup, message):
    if setup is None:
        root = tmp_path / "empty"
        root.mkdir()
    else:
        root = make_repository(tmp_path / "repository", {"color": ["1"]})
        (root / CONFIG_NAME).write_text(json.dumps(setup))
    env = {**os.environ, "VISIONSERVE_REPOSITORY": str(root), "BENTOML_HOME": str(tmp_path / "bentoml")}
    done = subprocess.run(
        [sys.executable, "-c", "import service.service"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("visionserve: cannot serve: ") and message in line


# --- the routes over several models, in this process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("two-models"), {"color": ["1"], "tint": ["1", "2"]})
    with in_process_repository(root, SETTINGS, ADMIN) as served:
        yield served


def test_each_model_answers_on_its_own_and_a_request_must_name_one(two_models):
    client, repository = two_models
    assert repository.models() == ["color", "tint"]
    for model in ("color", "tint"):
        response = client.post(f"/classify?model={model}", content=png("green"), headers=PNG)
        assert response.status_code == 200, response.text
        assert (response.json()["model"], response.json()["predictions"][0]["label"]) == (model, "green")
    assert client.post("/classify", json={"image": _b64(png("blue")), "model": "tint"}).json()["version"] == "2"
    form = client.post("/classify", files={"image": ("a.png", png("red"))}, data={"model": "color"})
    assert form.json()["model"] == "color"
    refused = client.post("/classify", content=png("red"), headers=PNG)
    assert (refused.status_code, refused.json()["code"]) == (400, "invalid_model_choice")
    assert "'color', 'tint'" in refused.json()["error"]
    conflict = client.post("/classify?model=color", json={"image": _b64(png("red")), "model": "tint"})
    assert (conflict.status_code, conflict.json()["code"]) == (400, "invalid_model_choice")
    batch = client.post("/classify_batch?model=tint&version=2", files=[("images", ("a.png", png("red")))])
    assert (batch.json()["model"], batch.json()["version"]) == ("tint", "2")


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def test_unknown_models_and_versions_are_404s_naming_what_is_served(two_models):
    client, _ = two_models
    for url, code, words in [
        ("/classify?model=nope", "model_not_found", "this server serves 'color', 'tint'"),
        ("/classify?model=tint&version=9", "version_not_found", "available: '2'"),
    ]:
        response = client.post(url, content=png("red"), headers=PNG)
        assert (response.status_code, response.json()["code"]) == (404, code)
        assert words in response.json()["error"]
    v2 = client.get("/v2/models/nope/config")
    assert (v2.status_code, v2.json()["code"]) == (404, "model_not_found")


def test_metadata_lists_every_model_and_the_v2_routes_serve_each(two_models):
    client, _ = two_models
    listed = client.get("/metadata").json()
    assert set(listed) == {"models", "workers"}
    assert {(m["name"], m["version"], m["default"]) for m in listed["models"]} == {
        ("color", "1", True),
        ("tint", "2", True),
    }
    assert all(m["memory_bytes"] >= 0 and m["memory_measure"] == "rss_delta_at_load" for m in listed["models"])
    assert all(m["intra_op_threads"] == 1 for m in listed["models"])  # 2 threads shared by 2 models
    one = client.get("/metadata?model=tint").json()
    assert (one["name"], one["version"], len(one["models"])) == ("tint", "2", 2)
    assert client.get("/v2/models/tint").json()["versions"] == ["2"]
    assert client.get("/v2/models/color/versions/1/ready").json() == {"name": "color", "ready": True}
    assert {e["name"] for e in client.get("/v2/models/stats").json()["model_stats"]} == {"color", "tint"}
    body = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [_b64(png("blue"))]}]}
    answer = client.post("/v2/models/tint/versions/2/infer", json=body).json()
    assert (answer["model_name"], answer["model_version"]) == ("tint", "2")


def test_metrics_are_labelled_by_model_and_version(two_models):
    client, _ = two_models
    client.post("/classify?model=tint", content=png("red"), headers=PNG)
    assert REGISTRY.get_sample_value("visionserve_batch_size_count", {"model": "tint", "version": "2"}) >= 1
    assert REGISTRY.get_sample_value("visionserve_model_loaded", {"model": "tint", "version": "2"}) == 1
    assert REGISTRY.get_sample_value("visionserve_model_memory_bytes", {"model": "color", "version": "1"}) >= 0


def test_the_index_lists_every_version_with_its_state(two_models):
    client, _ = two_models
    index = client.post("/v2/repository/index").json()
    assert [(e["name"], e["version"], e["state"]) for e in index] == [
        ("color", "1", "READY"),
        ("tint", "1", "UNAVAILABLE"),
        ("tint", "2", "READY"),
    ]
    assert index[1]["reason"] == "not loaded"
    assert [e["version"] for e in client.post("/v2/repository/index", json={"ready": True}).json()] == ["1", "2"]
    bad = client.post("/v2/repository/index", json={"ready": "yes"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")


# --- loading and unloading through the routes ----------------------------------------------------------------------


@pytest.fixture
def color_repository(tmp_path):
    root = make_repository(tmp_path / "repository", {"color": ["1"]})
    with in_process_repository(root, SETTINGS, ADMIN) as (client, repository):
        yield root, client, repository


def load(client, name: str = "color", version: str | None = None, headers=AS_ADMIN):
    body = {"parameters": {"version": version}} if version else None
    return client.post(f"/v2/repository/models/{name}/load", json=body, headers=headers)


def test_load_and_unload_want_the_admin_key(color_repository, tmp_path):
    root, client, _ = color_repository
    for route in ("load", "unload"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.post(f"/v2/repository/models/color/{route}", headers=headers)
            assert (response.status_code, response.json()["code"]) == (401, "unauthorized")
    with in_process_repository(root, SETTINGS) as (no_admin_file, _):
        refused = no_admin_file.post("/v2/repository/models/color/load", headers=AS_ADMIN)
        assert "VISIONSERVE_ADMIN_KEYS_FILE is not set" in refused.json()["error"]


def test_a_new_version_rolls_out_and_the_old_one_stops(color_repository):
    root, client, repository = color_repository
    old = repository.get("color")
    make_color_package(root / "color" / "2", version="2")
    loaded = load(client)  # the highest version by default
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["version"], loaded.json()["state"]) == ("2", "READY")
    assert loaded.json()["memory_bytes"] >= 0
    assert client.post("/classify", content=png("red"), headers=PNG).json()["version"] == "2"
    client.run(asyncio.sleep(0.05))
    assert not old.batcher.running  # unloaded: no request held it
    assert [(e["version"], e["state"]) for e in client.post("/v2/repository/index").json()] == [
        ("1", "UNAVAILABLE"),
        ("2", "READY"),
    ]
    back = load(client, version="1")  # a rollback is a load of the older version
    assert back.json()["version"] == "1"
    assert client.get("/metadata").json()["version"] == "1"


def test_requests_in_flight_during_a_rollout_all_succeed_on_a_live_version(color_repository):
    root, client, repository = color_repository
    make_color_package(root / "color" / "2", version="2")
    http = client._client

    async def scenario():
        async def classify():
            response = await http.post("/classify", content=png("blue"), headers=PNG)
            return response.status_code, response.json().get("version")

        before = [asyncio.create_task(classify()) for _ in range(30)]
        loading = asyncio.create_task(http.post("/v2/repository/models/color/load", headers=AS_ADMIN))
        during = [asyncio.create_task(classify()) for _ in range(30)]
        answers = await asyncio.gather(*before, *during)
        load_answer = await loading
        after = await asyncio.gather(*(classify() for _ in range(10)))
        return answers, load_answer, after

    answers, load_answer, after = client.run(scenario())
    assert load_answer.status_code == 200, load_answer.text
    assert {status for status, _ in answers} == {200}
    assert {version for _, version in answers} <= {"1", "2"}
    assert after == [(200, "2")] * 10


def test_a_request_admitted_to_the_old_version_finishes_there(tmp_path):
    root = make_repository(tmp_path, {"color": ["1", "2"]}, {"models": {"color": {"versions": ["1"]}}})
    settings = settings_for(root)
    source = RepositoryFolder(root)
    repository = ModelRepository.from_plan(settings, source, plan(source, settings))
    repository._models["color"].pinned = ()  # roll out over the start-up version, as without the config

    async def scenario():
        await repository.start()
        try:
            old = repository.get("color")
            lease = repository.lease("color")
            await repository.load("color", "2")
            assert repository.get("color").package.version == "2"
            assert old.batcher.running  # held by the lease
            probabilities = await old.infer(color_pixels("green"))  # the admitted request is answered by version 1
            assert probabilities.argmax() == 1
            lease.release()
            await asyncio.sleep(0.05)
            assert not old.batcher.running
        finally:
            await repository.stop()

    asyncio.run(scenario())


def make_unloadable(folder: Path) -> None:
    """An ONNX graph that parses but that ONNX Runtime cannot run (an operator it does not have)."""
    node = helper.make_node("NoSuchOperator", ["pixels"], ["probabilities"])
    graph = helper.make_graph(
        [node],
        "broken",
        [helper.make_tensor_value_info("pixels", onnx.TensorProto.UINT8, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), folder / "model.onnx"
    )
    reseal(folder)


@pytest.mark.parametrize(
    ("make", "status", "code", "words"),
    [
        (lambda root: None, 404, "version_not_found", "has no version '2'"),
        (lambda root: (root / "color" / "2").write_text("x"), 400, "invalid_model_name", "not a folder"),
        (
            lambda root: _tamper(make_color_package(root / "color" / "2", version="2")),
            422,
            "package_invalid",
            "fails its checksum",
        ),
        (
            lambda root: make_unloadable(make_color_package(root / "color" / "2", version="2")),
            422,
            "model_load_failed",
            "cannot create its session",
        ),
    ],
)
def test_a_bad_version_is_refused_and_the_current_one_keeps_serving(color_repository, make, status, code, words):
    root, client, repository = color_repository
    make(root)
    refused = load(client, version="2")
    assert (refused.status_code, refused.json()["code"]) == (status, code), refused.text
    assert words in refused.json()["error"]
    assert client.post("/classify", content=png("red"), headers=PNG).json()["version"] == "1"
    assert repository.ready


def _tamper(folder: Path) -> None:
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")


def test_a_version_that_fails_its_warm_up_is_refused(color_repository, monkeypatch):
    root, client, _ = color_repository
    make_color_package(root / "color" / "2", version="2")

    def failing(self, batch_size=1):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(Predictor, "warm_up", failing)
    refused = load(client)
    assert (refused.status_code, refused.json()["code"]) == (422, "model_load_failed")
    assert "warm-up failed: out of memory" in refused.json()["error"]
    index = client.post("/v2/repository/index").json()
    assert index[1]["state"] == "UNAVAILABLE" and "warm-up failed" in index[1]["reason"]
    monkeypatch.undo()
    assert client.post("/classify", content=png("red"), headers=PNG).json()["version"] == "1"


@pytest.mark.parametrize(
    ("name", "body", "status", "code"),
    [
        ("color", {"parameters": {"version": "../1"}}, 400, "invalid_model_name"),
        ("color", {"parameters": {"version": "a/b"}}, 400, "invalid_model_name"),
        ("%2E%2E", None, 400, "invalid_model_name"),  # ".." once decoded
        ("a%20b", None, 400, "invalid_model_name"),
        ("nope", None, 404, "model_not_found"),
        ("color", {"parameters": {"config": "{}"}}, 400, "invalid_request"),
        ("color", {"parameters": {"version": 2}}, 400, "invalid_request"),
        ("color", {"version": "2"}, 400, "invalid_request"),
        ("color", [1], 400, "invalid_json"),
    ],
)
def test_bad_load_requests_are_4xx_json(color_repository, name, body, status, code):
    _, client, _ = color_repository
    response = client.post(f"/v2/repository/models/{name}/load", json=body, headers=AS_ADMIN)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text


def test_a_second_load_while_one_runs_is_409(color_repository):
    root, client, repository = color_repository
    make_color_package(root / "color" / "2", version="2")
    make_color_package(root / "color" / "3", version="3")

    async def both():
        first = asyncio.create_task(repository.load("color", "2"))
        await asyncio.sleep(0)
        second = await asyncio.gather(repository.load("color", "3"), return_exceptions=True)
        await first
        return second[0]

    second = client.run(both())
    assert second.code == "load_in_progress"
    assert repository.get("color").package.version == "2"


def test_unload_then_load_again(color_repository):
    _, client, repository = color_repository
    unloaded = client.post("/v2/repository/models/color/unload", headers=AS_ADMIN)
    assert unloaded.json() == {"name": "color", "unloaded": ["1"], "default": None}
    gone = client.post("/classify?model=color", content=png("red"), headers=PNG)
    assert (gone.status_code, gone.json()["code"]) == (404, "model_not_found")
    assert "is not loaded" in gone.json()["error"]
    assert client.post("/v2/repository/index").json()[0]["reason"] == "unloaded"
    assert not repository.ready
    again = client.post("/v2/repository/models/color/unload", headers=AS_ADMIN)
    assert (again.status_code, again.json()["code"]) == (404, "model_not_found")
    assert load(client).status_code == 200
    assert client.post("/classify", content=png("red"), headers=PNG).json()["version"] == "1"


def test_polling_loads_a_new_version_refuses_a_tampered_one_once_and_a_new_model(color_repository):
    root, client, repository = color_repository
    assert client.run(repository.poll_once()) == []
    incoming = make_color_package(root / "color" / ".2.incoming", version="2")
    assert client.run(repository.poll_once()) == []  # hidden: still being copied
    incoming.rename(root / "color" / "2")
    assert client.run(repository.poll_once()) == ["color/2"]
    _tamper(make_color_package(root / "color" / "3", version="3"))
    assert client.run(repository.poll_once()) == []
    assert REGISTRY.get_sample_value("visionserve_model_loads_total", {"model": "color", "outcome": "refused"}) >= 1
    assert repository.get("color").package.version == "2"
    refused = REGISTRY.get_sample_value("visionserve_model_loads_total", {"model": "color", "outcome": "refused"})
    client.run(repository.poll_once())  # the same refused folder is not tried again
    assert (
        REGISTRY.get_sample_value("visionserve_model_loads_total", {"model": "color", "outcome": "refused"}) == refused
    )
    make_color_package(root / "tint" / "1", name="tint")
    assert client.run(repository.poll_once()) == ["tint/1"]
    assert repository.models() == ["color", "tint"]


# --- one package (VISIONSERVE_MODEL), and gRPC over several models -------------------------------------------------


def test_one_package_is_a_repository_of_one_model(tmp_path):
    from tests.support.in_process import in_process_service

    with in_process_service(make_color_package(tmp_path / "color"), SETTINGS) as client:
        metadata = client.get("/metadata").json()
        assert metadata["name"] == "color" and [m["name"] for m in metadata["models"]] == ["color"]
        assert client.post("/classify?model=color&version=1", content=png("red"), headers=PNG).status_code == 200
        index = client.post("/v2/repository/index").json()
        assert index == [{"name": "color", "version": "1", "state": "READY", "reason": ""}]


def test_several_packages_in_visionserve_model_are_one_model_each(tmp_path):
    first = make_color_package(tmp_path / "color")
    second = make_color_package(tmp_path / "tint", input_size=(48, 48), name="tint", version="4")
    settings = ServiceSettings(model=f" {first} ,{second}", device="cpu")
    assert settings.model_references == [str(first), str(second)]
    planned = plan(open_source(settings), settings)
    assert [(entry.name, entry.version) for entry in planned] == [("color", "1"), ("tint", "4")]
    assert {entry.settings.threads_per_worker for entry in planned} == {max(1, settings.threads_per_worker // 2)}


def test_two_packages_of_one_model_name_are_refused(tmp_path):
    first = make_color_package(tmp_path / "a")
    second = make_color_package(tmp_path / "b", version="2")
    with pytest.raises(RepositoryError, match="two packages are both model 'color'"):
        open_source(ServiceSettings(model=f"{first},{second}", device="cpu"))
    with pytest.raises(SettingsError, match="VISIONSERVE_MODEL must name"):
        ServiceSettings(model=" , ")


def test_grpc_serves_every_model(tmp_path):
    import grpc

    from benchmarks.servers import free_port
    from service import grpc_server
    from service.protos import grpc_service_pb2 as pb
    from service.protos import grpc_service_pb2_grpc as pb_grpc

    root = make_repository(tmp_path, {"color": ["1"], "tint": ["4"]})
    port = free_port()
    environ = {"VISIONSERVE_GRPC_PORT": str(port), "VISIONSERVE_GRPC_HOST": "127.0.0.1"}
    settings = settings_for(root, **environ)
    source = RepositoryFolder(root)
    repository = ModelRepository.from_plan(settings, source, plan(source, settings))

    async def scenario():
        await repository.start()
        server = await grpc_server.start(repository, AccessControl())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                pixels = color_pixels("blue").tobytes()
                tensor = pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 32, 32, 3])
                answers = []
                for name in ("color", "tint"):
                    request = pb.ModelInferRequest(model_name=name, inputs=[tensor], raw_input_contents=[pixels])
                    answers.append(await stub.ModelInfer(request, timeout=10))
                ready = await stub.ModelReady(pb.ModelReadyRequest(name="tint", version="4"), timeout=10)
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.ModelReady(pb.ModelReadyRequest(name="tint", version="1"), timeout=10)
                return answers, ready, missing.value
        finally:
            await grpc_server.stop(server, 1)
            await repository.stop()

    answers, ready, missing = asyncio.run(scenario())
    assert [(a.model_name, a.model_version) for a in answers] == [("color", "1"), ("tint", "4")]
    assert ready.ready and missing.code() == grpc.StatusCode.NOT_FOUND


# --- the real server ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_served_repository_answers_for_each_model_and_rolls_out_a_version(tmp_path):
    root = make_repository(tmp_path / "repository", {"color": ["1"], "tint": ["1"]})
    keys = tmp_path / "admin-keys"
    keys.write_text(hash_key(ADMIN_KEY) + "\n")
    settings = {**SETTINGS, "VISIONSERVE_REPOSITORY": str(root), "VISIONSERVE_ADMIN_KEYS_FILE": str(keys)}
    server = start_server(root / "color" / "1", tmp_path, settings)
    try:

        def call(path: str, data: bytes | None = None, headers=None) -> dict:
            request = urllib.request.Request(
                server.url + path, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        assert [m["name"] for m in call("/metadata")["models"]] == ["color", "tint"]
        assert call("/classify?model=tint", png("green"), PNG)["predictions"][0]["label"] == "green"
        make_color_package(root / "tint" / "2", name="tint", version="2")
        loaded = call("/v2/repository/models/tint/load", b"", AS_ADMIN)
        assert loaded["version"] == "2"
        assert call("/classify?model=tint", png("green"), PNG)["version"] == "2"
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            metrics = response.read().decode()
        assert 'visionserve_model_loaded{model="tint",version="2"} 1.0' in metrics
    finally:
        stop_server(server)
