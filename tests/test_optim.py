"""Tests for training.optim: parameter groups (no decay on BN/bias, lr scales) and every schedule's curve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training import optim
from training.config import ConfigError, TrainConfig
from training.models import build_model, list_models


def _config(**changes) -> TrainConfig:
    return TrainConfig(model="cnn_bn", data="unused", out="unused", **changes)


def _lrs(schedule: str, *, epochs=4, steps_per_epoch=10, warmup_epochs=1.0, lr=0.1) -> list[float]:
    """The lr used at every optimizer step of a run."""
    config = _config(schedule=schedule, epochs=epochs, warmup_epochs=warmup_epochs, lr=lr)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = optim.build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name", [info.name for info in list_models()])
def test_param_groups_cover_every_trainable_parameter_once(name):
    model = build_model(name, 10)
    groups = optim.param_groups(model, lr=0.1, weight_decay=5e-4)
    ids = [id(p) for group in groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_no_weight_decay_on_batch_norm_and_bias_parameters():
    model = build_model("cnn_bn", 10)
    groups = optim.param_groups(model, lr=0.1, weight_decay=5e-4)
    decay_of = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.BatchNorm2d) or name == "bias":
                assert decay_of[id(param)] == 0.0, (type(module).__name__, name)
            else:
                assert decay_of[id(param)] == 5e-4, (type(module).__name__, name)


def test_head_and_bn_bias_lr_scales():
    model = build_model("cnn_bn", 10)
    head = model.classifier[1]
    bn = model.features[1]
    groups = optim.param_groups(
        model,
        lr=0.1,
        weight_decay=0.0,
        head=head.parameters(),
        backbone_lr_scale=0.01,
        bn_bias_lr_scale=8.0,
    )
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert lr_of[id(head.weight)] == pytest.approx(0.1)
    assert lr_of[id(model.features[0].weight)] == pytest.approx(0.001)
    assert lr_of[id(bn.weight)] == pytest.approx(0.001)
    assert lr_of[id(bn.bias)] == pytest.approx(0.008)


def test_frozen_parameters_are_left_out():
    model = build_model("cnn_bn", 10)
    model.features.requires_grad_(False)
    groups = optim.param_groups(model, lr=0.1, weight_decay=0.0)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.classifier.parameters()}


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "constant"])
def test_schedule_warms_up_linearly_then_decays(schedule):
    lr, warmup = 0.1, 10
    lrs = _lrs(schedule, lr=lr)
    assert lrs[:warmup] == pytest.approx([lr * (i + 1) / warmup for i in range(warmup)])
    assert lrs[warmup] == pytest.approx(lr)  # the peak, at the first step after warmup
    after = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:], strict=False))  # never rises again
    expected_last = {
        "cosine": (0.0, 0.001),
        "onecycle": (0.0, 0.004),
        "step": (0.001, 0.001),
        "constant": (0.1, 0.1),
    }
    low, high = expected_last[schedule]
    assert low - 1e-9 <= lrs[-1] <= high + 1e-9


def test_schedule_shapes_differ_mid_run():
    mid = 25  # of 40 steps, 15 after the 10 warmup steps: progress 0.5
    assert _lrs("cosine")[mid] == pytest.approx(0.05)
    assert _lrs("onecycle")[mid] == pytest.approx(0.05)
    assert _lrs("step")[mid] == pytest.approx(0.01)
    assert _lrs("step")[mid - 1] == pytest.approx(0.1)


def test_no_warmup_starts_at_the_peak():
    assert _lrs("cosine", warmup_epochs=0)[0] == pytest.approx(0.1)


def test_schedule_keeps_group_lr_ratios():
    config = _config(schedule="cosine", epochs=2, lr=0.1)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)
    scheduler = optim.build_scheduler(optimizer, config, steps_per_epoch=5)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
        first, second = (group["lr"] for group in optimizer.param_groups)
        assert second == pytest.approx(first / 10)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: sgd, adamw, adam"):
        _config(optimizer="lion")
    with pytest.raises(ConfigError, match="cosine, onecycle, step, constant"):
        _config(schedule="exponential")
    with pytest.raises(ConfigError, match="cosine"):
        optim.lr_factor("exponential", 0, 10, 0)


@pytest.mark.parametrize(
    "name,kind",
    [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)],
)
def test_build_optimizer_by_name(name, kind):
    model = build_model("cnn_bn", 10)
    config = _config(optimizer=name, nesterov=name == "sgd")
    optimizer = optim.build_optimizer(optim.param_groups(model, lr=0.1, weight_decay=1e-4), config)
    assert isinstance(optimizer, kind)
