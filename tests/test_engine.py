"""Tests for training.engine: the registry's models learn, run folders, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from inference.spec import IMAGENET_MEAN, IMAGENET_STD
from tests.support.training_data import REPO, tiny_dataset, train_config, write_image_tree
from training import engine, models
from training.checkpoint import CHECKPOINT_NAME, CHECKPOINT_VERSION, load_checkpoint
from training.config import ConfigError, TrainConfig, TrainingError
from training.models import CIFAR10_MEAN, CIFAR10_STD, build_model, get_model_info, list_models, model_spec


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def callback(done: int, row: dict) -> None:
        if done == epoch:
            raise Interrupt

    return callback


# ---- the registry's models ----------------------------------------------------------------------------------


# ImageNet-sized ResNets are too slow on a CPU for the quick test selection.
HEAVY_MODELS = {"resnet18", "resnet18_transfer", "resnet50_transfer"}
SMALL_VARIANTS = {"airbench": {"widths": (16, 32, 32)}}  # the learning check only; shapes use the defaults


@pytest.mark.parametrize(
    "name",
    [pytest.param(i.name, marks=[pytest.mark.slow] if i.name in HEAVY_MODELS else []) for i in list_models()],
)
def test_every_model_gives_logits_and_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    info = next(i for i in list_models() if i.name == name)
    model = build_model(name, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *info.input_size)).shape == (
            2,
            3,
        )  # at the model's default input size

    model = build_model(name, 3, (32, 32), **SMALL_VARIANTS.get(name, {})).to(memory_format=torch.channels_last)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    if hasattr(model, "init_from_data"):
        model.init_from_data(x)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


EXPECTED_NORMALISATION = {
    "simple_cnn": (CIFAR10_MEAN, CIFAR10_STD),
    "lenet": (CIFAR10_MEAN, CIFAR10_STD),
    "cnn_bn": (CIFAR10_MEAN, CIFAR10_STD),
    "cnn_plain": (CIFAR10_MEAN, CIFAR10_STD),
    "resnet18": (CIFAR10_MEAN, CIFAR10_STD),
    "airbench": (CIFAR10_MEAN, CIFAR10_STD),
    "resnet18_transfer": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet50_transfer": (IMAGENET_MEAN, IMAGENET_STD),
}


def test_every_registry_entry_declares_its_normalisation():
    assert {info.name for info in list_models()} == set(EXPECTED_NORMALISATION)
    for info in list_models():
        assert (info.mean, info.std) == EXPECTED_NORMALISATION[info.name], info.name
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)


def test_model_spec_takes_the_registry_entry():
    spec = model_spec("resnet18_transfer", ("a", "b"))
    assert (spec.mean, spec.std, spec.input_size) == (IMAGENET_MEAN, IMAGENET_STD, (64, 64))
    spec = model_spec("airbench", ("a", "b"), (24, 24), {"widths": [8, 16, 16]})
    assert (spec.mean, spec.std, spec.input_size) == (CIFAR10_MEAN, CIFAR10_STD, (24, 24))
    assert spec.arch_kwargs == {"widths": [8, 16, 16]}


def test_airbench_stem_whitens_patches_and_stays_frozen():
    model = build_model("airbench", 10, widths=(8, 16, 16))
    x = torch.randn(64, 3, 16, 16) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    model.init_from_data(x)
    out = model.whiten(x) - model.whiten.bias.view(1, -1, 1, 1)  # (N, 24, 15, 15)
    channels = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    channels = channels - channels.mean(0)
    covariance = channels.T @ channels / len(channels)
    assert torch.allclose(covariance, torch.eye(12), atol=0.02)
    assert not model.whiten.weight.requires_grad
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_airbench_convs_start_as_identity_and_its_norms_only_shift():
    model = build_model("airbench", 10, widths=(8, 16, 16))
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    with torch.no_grad():
        for conv in convs:
            x = torch.randn(2, conv.in_channels, 6, 6)
            kept = min(conv.in_channels, conv.out_channels)  # the filters initialised as the identity
            assert torch.allclose(conv(x)[:, :kept], x[:, :kept])
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not n.weight.requires_grad and n.bias.requires_grad for n in norms)


# ---- train(): run folder, metrics, checkpoint ------------------------------------------------------------------


def test_train_writes_the_run_folder(tmp_path):
    result = engine.train(train_config(tmp_path), dataset=tiny_dataset())
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {
        "checkpoint.pt",
        "config.json",
        "history.json",
        "history.csv",
        "metrics.json",
    }
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"model", "data", "epochs", "test_accuracy", "test_loss", "train_seconds", "parameters",
                            "class_names", "pretrained"}  # fmt: skip
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["epochs"] == 2 and metrics["pretrained"] is None
    assert metrics["class_names"] == ["cat", "dog", "ship"]
    assert metrics["parameters"] == sum(p.numel() for p in result.model.parameters())
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert set(history[0]) == set(engine.HISTORY_FIELDS)
    csv_lines = (run / "history.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(engine.HISTORY_FIELDS) and len(csv_lines) == 3
    saved = json.loads((run / "config.json").read_text())
    assert saved["input_size"] == [32, 32]  # resolved from the model's default
    assert TrainConfig.from_dict(saved) == result.config
    assert result.evaluation.probabilities.shape == (12, 3)
    spec = load_checkpoint(run).spec  # the registry's normalisation, which the exported graph will apply
    assert spec == result.spec and (spec.mean, spec.std) == (CIFAR10_MEAN, CIFAR10_STD)


@pytest.mark.slow
def test_a_few_epochs_learn_the_synthetic_task(tmp_path):
    result = engine.train(train_config(tmp_path, epochs=4, augment=False), dataset=tiny_dataset(per_class=32))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.metrics["test_accuracy"] >= 0.75


def test_checkpoint_round_trip_gives_the_same_predictions(tmp_path):
    result = engine.train(train_config(tmp_path, epochs=1, ema=True), dataset=tiny_dataset())
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.epoch == 1 and checkpoint.spec.class_names == ("cat", "dog", "ship")
    assert checkpoint.config == result.config.to_dict()
    assert checkpoint.metrics["test_accuracy"] == result.metrics["test_accuracy"]
    assert _states_equal(checkpoint.model_state, result.model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the result's model is channels_last: the same up to rounding
        torch.testing.assert_close(checkpoint.build_model()(x), result.model(x))
    assert set(checkpoint.training_state) >= {
        "optimizer",
        "scheduler",
        "data_generator",
        "torch_rng",
        "live_model_state",
    }


def _ema_state(seed: int = 0) -> engine.TrainingState:
    torch.manual_seed(seed)
    model = build_model("cnn_bn", 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return engine.TrainingState(
        model=model,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)),
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
        ema=torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True),
    )


def test_training_state_round_trips_through_its_state_dict():
    trained = _ema_state()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        nn.functional.cross_entropy(trained.model(x), y).backward()
        trained.optimizer.step()
        trained.scheduler.step()
        trained.ema.update_parameters(trained.model)
    torch.randint(0, 9, (3,), generator=trained.generator)
    trained.history.append({"epoch": 1, "train_loss": 1.0})
    trained.train_seconds = 2.5
    saved = trained.state_dict()
    assert saved["epoch"] == 1 and saved["history"] == [{"epoch": 1, "train_loss": 1.0}]
    assert set(saved["training_state"]) == {  # the version-1 checkpoint layout: resume reads exactly these
        "optimizer", "scheduler", "data_generator", "torch_rng", "train_seconds", "live_model_state", "ema_updates",
    }  # fmt: skip

    restored = _ema_state(seed=1)
    restored.load_state_dict(saved)
    assert _states_equal(restored.model.state_dict(), trained.model.state_dict())
    assert _states_equal(restored.ema.module.state_dict(), trained.ema.module.state_dict())
    assert int(restored.ema.n_averaged) == 2 and restored.scheduler.last_epoch == 2
    assert restored.optimizer.state_dict()["state"].keys() == trained.optimizer.state_dict()["state"].keys()
    assert torch.equal(restored.generator.get_state(), trained.generator.get_state())
    assert (restored.epoch, restored.history, restored.train_seconds) == (1, trained.history, 2.5)
    assert restored.history is not saved["history"]


def test_a_fresh_run_refuses_an_existing_run_folder(tmp_path):
    engine.train(train_config(tmp_path, epochs=1), dataset=tiny_dataset())
    with pytest.raises(TrainingError, match="--resume"):
        engine.train(train_config(tmp_path, epochs=1), dataset=tiny_dataset())


def conv_output_dtypes(monkeypatch) -> set[torch.dtype]:
    """The dtypes that every Conv2d forward pass produces from now on (training and evaluation)."""
    seen: set[torch.dtype] = set()
    original = torch.nn.Conv2d.forward

    def forward(self, x):
        out = original(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", forward)
    return seen


def test_amp_on_a_cpu_without_native_bfloat16_warns_and_trains_in_float32(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(engine, "native_bfloat16", lambda device: False)
    dtypes = conv_output_dtypes(monkeypatch)
    result = engine.train(train_config(tmp_path, epochs=1, amp=True, device="cpu"), dataset=tiny_dataset())
    assert "--amp needs a CUDA GPU or a CPU with native bfloat16" in caplog.text
    assert result.metrics["precision"] == "float32" and dtypes == {torch.float32}


def test_amp_on_a_bfloat16_cpu_trains_in_bfloat16_and_evaluates_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "native_bfloat16", lambda device: True)  # autocast works on any CPU, if slowly
    dtypes = conv_output_dtypes(monkeypatch)
    result = engine.train(train_config(tmp_path, epochs=3, amp=True, device="cpu"), dataset=tiny_dataset())
    assert result.metrics["precision"] == "bfloat16 autocast"
    assert dtypes == {torch.bfloat16, torch.float32}  # training steps, then the float32 evaluation
    history = result.history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_evaluate_with_flip_tta_averages_logits():
    torch.manual_seed(0)
    model = build_model("cnn_bn", 3).eval()
    data = tiny_dataset()
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = engine.evaluate(model, data.test_images, data.test_labels, mean=mean, std=std)
    tta = engine.evaluate(model, data.test_images, data.test_labels, mean=mean, std=std, tta=True, batch_size=5)
    x = (torch.from_numpy(data.test_images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        expected = torch.softmax((model(x) + model(x.flip(3))) / 2, dim=1).numpy()
    np.testing.assert_allclose(tta.probabilities, expected, atol=1e-5)
    assert not np.allclose(plain.probabilities, tta.probabilities)
    np.testing.assert_allclose(plain.probabilities.sum(1), 1.0, atol=1e-5)
    assert 0.0 <= plain.accuracy <= 1.0


def test_frozen_batch_norm_stays_in_eval_mode():
    model = build_model("cnn_bn", 3)
    model.features.requires_grad_(False)
    engine.set_train_mode(model)
    assert not model.features[1].training and model.classifier.training


# ---- resume ----------------------------------------------------------------------------------------------


def test_resume_after_an_interruption_ends_exactly_like_an_uninterrupted_run(tmp_path):
    # simple_cnn has dropout (the global torch RNG); augmentation uses the data generator; EMA is on.
    settings = dict(model="simple_cnn", epochs=2, ema=True, augment=True, schedule="cosine", warmup_epochs=0.5)
    data = tiny_dataset()
    straight = engine.train(train_config(tmp_path, "straight", **settings), dataset=data)
    with pytest.raises(Interrupt):
        engine.train(train_config(tmp_path, "resumed", **settings), dataset=data, on_epoch_end=_stop_after(1))
    assert load_checkpoint(tmp_path / "resumed").epoch == 1
    resumed = engine.train(train_config(tmp_path, "resumed", resume=True, **settings), dataset=data)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert _states_equal(a.model_state, b.model_state)
    assert _states_equal(a.training_state["live_model_state"], b.training_state["live_model_state"])
    assert [r["train_loss"] for r in straight.history] == [r["train_loss"] for r in resumed.history]
    assert straight.metrics["test_accuracy"] == resumed.metrics["test_accuracy"]


def _with_imagenet_normalisation(monkeypatch, name: str) -> None:
    """The registry gives `name` ImageNet's statistics while patched: a stand-in for a run that recorded them."""
    info = get_model_info(name)
    monkeypatch.setitem(models._REGISTRY, name, replace(info, mean=IMAGENET_MEAN, std=IMAGENET_STD))


def test_resuming_a_run_keeps_the_normalisation_its_checkpoint_records(tmp_path, monkeypatch):
    settings = dict(model="simple_cnn", epochs=2, ema=True, augment=True, schedule="cosine", warmup_epochs=0.5)
    data = tiny_dataset()
    with monkeypatch.context() as patch:
        _with_imagenet_normalisation(patch, "simple_cnn")
        engine.train(train_config(tmp_path, "straight", **settings), dataset=data)
        with pytest.raises(Interrupt):
            engine.train(train_config(tmp_path, "resumed", **settings), dataset=data, on_epoch_end=_stop_after(1))
    assert get_model_info("simple_cnn").mean == CIFAR10_MEAN  # the registry now says otherwise

    resumed = engine.train(train_config(tmp_path, "resumed", resume=True, **settings), dataset=data)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert (b.spec.mean, b.spec.std) == (resumed.spec.mean, resumed.spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert b.spec == a.spec
    assert _states_equal(a.model_state, b.model_state)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_a_version_1_checkpoint_loads_with_its_imagenet_spec(tmp_path):
    engine.train(train_config(tmp_path, epochs=1, ema=True), dataset=tiny_dataset())
    path = tmp_path / "run" / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    assert payload["format_version"] == CHECKPOINT_VERSION == 1
    payload["spec"].update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))  # what an older run of a CIFAR net records
    torch.save(payload, path)
    checkpoint = load_checkpoint(path)
    assert (checkpoint.spec.mean, checkpoint.spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert checkpoint.build_model()(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_extending_epochs_continues_a_constant_schedule_exactly(tmp_path):
    settings = dict(schedule="constant", warmup_epochs=0)
    data = tiny_dataset()
    engine.train(train_config(tmp_path, "two", epochs=2, **settings), dataset=data)
    engine.train(train_config(tmp_path, "one_plus_one", epochs=1, **settings), dataset=data)
    engine.train(train_config(tmp_path, "one_plus_one", epochs=2, resume=True, **settings), dataset=data)
    a, b = load_checkpoint(tmp_path / "two"), load_checkpoint(tmp_path / "one_plus_one")
    assert b.epoch == 2 and _states_equal(a.model_state, b.model_state)


def test_resume_with_another_config_is_refused(tmp_path):
    engine.train(train_config(tmp_path, epochs=1), dataset=tiny_dataset())
    with pytest.raises(ConfigError, match="lr=0.05 \\(run\\) vs 0.1 \\(now\\)"):
        engine.train(train_config(tmp_path, epochs=2, lr=0.1, resume=True), dataset=tiny_dataset())


def test_resume_of_a_missing_run_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        engine.train(train_config(tmp_path, resume=True), dataset=tiny_dataset())


@pytest.mark.slow
@pytest.mark.e2e
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    tree = write_image_tree(tmp_path / "data", tiny_dataset(classes=("cat", "dog"), per_class=48, test_per_class=4))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def command(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "training", "train", "--model", "resnet18", "--data", str(tree),
                "--epochs", "2", "--batch-size", "16", "--out", str(tmp_path / out), "--num-threads", "1",
                "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-report", *extra]  # fmt: skip

    subprocess.run(command("straight"), env=env, check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(command("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed in its second epoch"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert load_checkpoint(checkpoint).epoch == 1  # killed during epoch 2

    resumed = subprocess.run(command("killed", "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(checkpoint)
    assert b.epoch == 2 and _states_equal(a.model_state, b.model_state)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
