"""The worker count chosen when VISIONSERVE_WORKERS is not set: from the cores and the model's measured cost."""

from __future__ import annotations

import json

import pytest

from service import defaults
from service.defaults import CHOICE_VARIABLE, choose_workers, model_call_cost
from service.settings import ServiceSettings
from tests.support.color_package import make_color_package


@pytest.fixture(autouse=True)
def no_inherited_choice(monkeypatch):
    # Empty counts as unset; monkeypatch removes the variable again after the test, whatever the code wrote.
    monkeypatch.setenv(CHOICE_VARIABLE, "")


def fake_machine(monkeypatch, cores: int, device: str, ms: float) -> list:
    calls = []

    def cost(root, backend, device_asked):
        calls.append((root, backend, device_asked))
        return device, ms

    monkeypatch.setattr(defaults, "cpu_threads", lambda: cores)
    monkeypatch.setattr(defaults, "model_call_cost", cost)
    return calls


def test_a_cheap_model_gets_one_worker_per_core_up_to_the_cap(tmp_path, monkeypatch):
    package = make_color_package(tmp_path / "color")
    from inference.package import load_package

    calls = fake_machine(monkeypatch, cores=4, device="cpu", ms=0.2)
    choice = choose_workers(ServiceSettings(model=str(package), device="cpu"), [load_package(package)])
    assert (choice.workers, choice.chosen_by) == (4, "auto")
    assert "cheap model (0.20 ms" in choice.reason and calls == [(package, "onnx", "cpu")]
    monkeypatch.setenv(CHOICE_VARIABLE, "")
    fake_machine(monkeypatch, cores=64, device="cpu", ms=0.2)
    assert choose_workers(ServiceSettings(model=str(package)), [load_package(package)]).workers == 8


@pytest.mark.parametrize(
    ("cores", "device", "ms", "words"),
    [
        (2, "cpu", 12.0, "compute-bound model (12.0 ms"),
        (2, "cuda", 0.1, "runs on the GPU"),
        (1, "cpu", 0.1, "one core"),
    ],
)
def test_one_worker_for_a_compute_bound_model_a_gpu_or_one_core(tmp_path, monkeypatch, cores, device, ms, words):
    from inference.package import load_package

    package = load_package(make_color_package(tmp_path / "color"))
    fake_machine(monkeypatch, cores, device, ms)
    choice = choose_workers(ServiceSettings(model=str(package.root)), [package])
    assert choice.workers == 1 and words in choice.reason


def test_a_repository_folder_gets_one_worker_and_a_set_value_is_kept(monkeypatch):
    calls = fake_machine(monkeypatch, cores=4, device="cpu", ms=0.1)
    assert choose_workers(ServiceSettings(repository="/srv/models"), []).workers == 1
    assert choose_workers(ServiceSettings(workers=3), []).describe() == {
        "workers": 3,
        "chosen_by": "VISIONSERVE_WORKERS",
        "reason": "set",
    }
    assert calls == []  # nothing measured for either


def test_workers_take_the_choice_of_the_process_that_started_them_only_for_the_same_configuration(
    tmp_path, monkeypatch
):
    from inference.package import load_package

    package = load_package(make_color_package(tmp_path / "color"))
    calls = fake_machine(monkeypatch, cores=2, device="cpu", ms=0.3)
    first = choose_workers(ServiceSettings(model=str(package.root)), [package])
    assert json.loads(defaults.os.environ[CHOICE_VARIABLE])["workers"] == first.workers == 2
    assert choose_workers(ServiceSettings(model=str(package.root)), [package]) == first
    assert len(calls) == 1  # the second call (a worker) measured nothing
    choose_workers(ServiceSettings(model=str(package.root), backend="onnx", device="cpu"), [package])
    assert len(calls) == 2  # another configuration is measured again


def test_the_cost_is_measured_in_a_child_process(tmp_path):
    device, milliseconds = model_call_cost(make_color_package(tmp_path / "color"), "onnx", "cpu")
    assert device == "cpu" and 0 < milliseconds < 1000


def test_a_failed_measurement_is_one_line(tmp_path):
    with pytest.raises(defaults.WorkerChoiceError, match="measuring the model's cost"):
        model_call_cost(tmp_path / "missing", "onnx", "cpu")


@pytest.mark.e2e
def test_the_server_chooses_its_workers_and_says_so(tmp_path):
    import httpx

    from inference.runtime import cpu_threads
    from tests.support.servers import SERVICE_TEST_SETTINGS, start_server, stop_server

    settings = {name: value for name, value in SERVICE_TEST_SETTINGS.items() if name != "VISIONSERVE_WORKERS"}
    running = start_server(make_color_package(tmp_path / "color"), tmp_path, settings)
    try:
        workers = httpx.get(f"{running.url}/metadata").json()["workers"]
        log = running.server.log_path.read_text(errors="replace")
    finally:
        stop_server(running)
    cores = cpu_threads()
    expected = 1 if cores == 1 else min(cores, defaults.MAX_AUTO_WORKERS)
    assert (workers["workers"], workers["chosen_by"]) == (expected, "auto"), workers
    assert f"{expected} worker(s), chosen automatically" in log
