"""Tests for training.transfer: loading backbones (ImageNet API, files, our checkpoints), frozen and finetune modes."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
from torch import nn

from tests.support.training_data import tiny_dataset, train_config
from training import engine, optim, transfer
from training.checkpoint import load_checkpoint
from training.config import ConfigError
from training.models import build_model
from training.transfer import TransferError


def _resnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18_transfer", num_classes)


def _backbone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A 1000-class ResNet-18 state dict standing in for ImageNet weights; returns (path, sha256, state)."""
    state = _resnet(1000, seed=1).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), state


def test_head_is_the_last_linear_layer():
    assert transfer.head_name(_resnet()) == "fc"
    assert transfer.head_name(build_model("cnn_bn", 10)) == "classifier.1"


def test_local_weights_file_loads_the_backbone_and_keeps_a_random_head(weights_file):
    path, digest, state = weights_file
    model = _resnet()
    head_before = model.fc.weight.clone()
    origin = transfer.load_pretrained(model, "resnet18_transfer", str(path), sha256=digest.upper())
    assert origin == f"file sha256:{digest}"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, head_before) and model.fc.out_features == 10


def test_wrong_sha256_is_refused(weights_file):
    path, digest, _ = weights_file
    wrong = "0" * 64
    with pytest.raises(TransferError, match=f"has sha256 {digest}, expected {wrong}"):
        transfer.load_pretrained(_resnet(), "resnet18_transfer", str(path), sha256=wrong)


def test_missing_file_and_wrong_keys_are_refused(tmp_path):
    with pytest.raises(TransferError, match="does not exist"):
        transfer.load_pretrained(_resnet(), "resnet18_transfer", str(tmp_path / "nope.pth"))
    other = tmp_path / "cnn.pth"
    torch.save(build_model("cnn_bn", 10).state_dict(), other)
    with pytest.raises(TransferError, match="missing keys"):
        transfer.load_pretrained(_resnet(), "resnet18_transfer", str(other))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(TransferError, match="not a readable weights file"):
        transfer.load_pretrained(_resnet(), "resnet18_transfer", str(garbage))


def test_wrong_shapes_are_refused(tmp_path):
    state = build_model("cnn_bn", 10).state_dict()
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "shapes.pth"
    torch.save(state, path)
    with pytest.raises(TransferError, match="other shapes: features.0.weight"):
        transfer.load_pretrained(build_model("cnn_bn", 10), "cnn_bn", str(path))


def test_imagenet_weights_come_from_torchvisions_weights_api(monkeypatch, weights_file):
    _, _, state = weights_file

    class FakeWeights:  # stands in for ResNet18_Weights.IMAGENET1K_V1 (no network here)
        name = "IMAGENET1K_V1"
        calls = []

        def get_state_dict(self, progress: bool = True):
            self.calls.append(progress)
            return state

    monkeypatch.setitem(transfer.IMAGENET_WEIGHTS, "resnet18_transfer", FakeWeights())
    model = _resnet()
    assert transfer.load_pretrained(model, "resnet18_transfer", "imagenet") == "imagenet (torchvision IMAGENET1K_V1)"
    assert FakeWeights.calls == [True]
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_imagenet_download_failure_suggests_a_local_file(monkeypatch):
    class OfflineWeights:
        name = "IMAGENET1K_V1"

        def get_state_dict(self, progress: bool = True):
            raise urllib.error.URLError("no network")

    monkeypatch.setitem(transfer.IMAGENET_WEIGHTS, "resnet18_transfer", OfflineWeights())
    with pytest.raises(TransferError, match="--pretrained PATH"):
        transfer.load_pretrained(_resnet(), "resnet18_transfer", "imagenet")


def test_real_imagenet_weights_are_registered_for_both_transfer_models(tmp_path):
    assert transfer.IMAGENET_WEIGHTS["resnet18_transfer"].url.endswith(".pth")
    assert transfer.IMAGENET_WEIGHTS["resnet50_transfer"].url.endswith(".pth")
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        train_config(tmp_path, model="cnn_bn", pretrained="imagenet")


def test_frozen_mode_trains_only_the_head_and_keeps_bn_statistics():
    model = _resnet()
    transfer.freeze_backbone(model)
    backbone_before, head_before = _backbone(model), model.fc.weight.clone()
    groups = optim.param_groups(model, lr=0.1, weight_decay=5e-4)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.fc.parameters()}
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    engine.set_train_mode(model)
    assert not model.layer1[0].bn1.training and model.training
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    after = _backbone(model)
    assert all(torch.equal(after[k], backbone_before[k]) for k in after)  # weights and BN running stats
    assert not torch.equal(model.fc.weight, head_before)


def test_finetune_groups_put_the_backbone_at_a_scaled_lr():
    model = _resnet()
    groups = optim.param_groups(
        model,
        lr=0.01,
        weight_decay=5e-4,
        head=transfer.head_parameters(model),
        backbone_lr_scale=0.1,
    )
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in groups)  # each parameter exactly once
    assert set(lr_of) == {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in model.fc.parameters()}
    for param in model.parameters():
        assert lr_of[id(param)] == pytest.approx(0.01 if id(param) in head_ids else 0.001)


def test_transfer_from_our_own_checkpoint_to_other_classes(tmp_path):
    # Pretrain on two classes, then start a three-class run from that backbone with a frozen backbone.
    engine.train(train_config(tmp_path, "source", epochs=1), dataset=tiny_dataset(classes=("a", "b")))
    source = load_checkpoint(tmp_path / "source")
    target = train_config(
        tmp_path,
        "target",
        epochs=1,
        pretrained=str(tmp_path / "source" / "checkpoint.pt"),
        mode="frozen",
    )
    result = engine.train(target, dataset=tiny_dataset(classes=("c", "d", "e")))
    assert result.metrics["pretrained"].startswith("checkpoint checkpoint.pt (cnn_bn, epoch 1) sha256:")
    trained = result.model.state_dict()
    for key, value in source.model_state.items():
        if not key.startswith("classifier."):  # frozen: the backbone, BN statistics included, is unchanged
            assert torch.equal(trained[key], value), key
    assert trained["classifier.1.weight"].shape == (3, 4096)
    # The provenance survives a resume.
    resumed = engine.train(target.replace(epochs=2, resume=True), dataset=tiny_dataset(classes=("c", "d", "e")))
    assert resumed.metrics["pretrained"] == result.metrics["pretrained"]


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    engine.train(train_config(tmp_path, "source", epochs=1), dataset=tiny_dataset(classes=("a", "b")))
    with pytest.raises(TransferError, match="holds a 'cnn_bn' model, not 'lenet'"):
        transfer.load_pretrained(build_model("lenet", 3), "lenet", str(tmp_path / "source" / "checkpoint.pt"))


def test_frozen_mode_needs_pretrained_weights(tmp_path):
    with pytest.raises(ConfigError, match="--mode frozen needs --pretrained"):
        train_config(tmp_path, mode="frozen")
