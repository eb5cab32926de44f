"""Tests for training.recipes and `train --recipe`: presets resolve to valid configs, flags override them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.support.training_data import tiny_dataset, write_image_tree
from training import engine
from training.cli import main
from training.config import ConfigError, TrainConfig
from training.models import build_model
from training.recipes import RECIPES, apply_recipe, get_recipe

CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("recipes") / "data", tiny_dataset())


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_to_a_valid_config_and_model(name):
    recipe = get_recipe(name)
    assert set(recipe.settings) <= CONFIG_FIELDS
    assert not {"data", "out", "recipe"} & set(recipe.settings)
    config = TrainConfig(**apply_recipe(name, {"data": "cifar10", "out": "runs/x"}))
    assert config.recipe == name and config.model == recipe.settings["model"]
    for key, value in recipe.settings.items():
        assert getattr(config, key) == value, key
    model = build_model(config.model, 10, config.input_size, **config.arch_kwargs)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_given_values_override_the_recipe_and_the_preset_is_not_shared():
    given = {"epochs": 7, "lr": 0.01, "arch_kwargs": {"widths": [8, 8, 8]}}
    settings = apply_recipe("quick", given)
    assert settings["epochs"] == 7 and settings["lr"] == 0.01
    assert settings["arch_kwargs"] == {"widths": [8, 8, 8]}
    assert settings["schedule"] == RECIPES["quick"].settings["schedule"]
    fresh = apply_recipe("quick", {})
    fresh["arch_kwargs"]["widths"].append(1)
    assert apply_recipe("quick", {})["arch_kwargs"] == RECIPES["quick"].settings["arch_kwargs"]


def test_another_model_drops_the_recipes_architecture_arguments():
    settings = apply_recipe("quick", {"model": "cnn_bn", "data": "cifar10", "out": "runs/x"})
    assert "arch_kwargs" not in settings
    assert TrainConfig(**settings).model == "cnn_bn"


def test_unknown_recipe_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'fastest'; valid recipes: quick"):
        apply_recipe("fastest", {})


def test_cli_recipe_with_overriding_flags(tree, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--recipe", "lesson", "--model", "cnn_plain", "--data", str(tree), "--out", str(run),
            "--epochs", "1", "--batch-size", "16", "--lr", "0.01", "--crop-padding", "0",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--no-report"]  # fmt: skip
    assert main(args) == 0
    config = json.loads((run / "config.json").read_text())
    lesson = RECIPES["lesson"].settings
    assert config["recipe"] == "lesson" and config["model"] == "cnn_plain"
    given = (config["epochs"], config["batch_size"], config["lr"], config["crop_padding"])
    assert given == (1, 16, 0.01, 0)
    assert config["schedule"] == lesson["schedule"] and config["nesterov"] is lesson["nesterov"]
    assert config["rotate_degrees"] == lesson["rotate_degrees"]
    capsys.readouterr()


def test_cli_unknown_recipe_is_one_line(tree, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--recipe", "fastest", "--data", str(tree), "--out", str(run)])
    err = _one_line_error(capsys, code)
    assert "unknown recipe 'fastest'" in err and "quick" in err
    assert not run.exists()


def test_cli_lists_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in RECIPES)


def test_negative_augmentation_strength_is_refused():
    with pytest.raises(ConfigError, match="crop padding must be >= 0"):
        TrainConfig(model="cnn_bn", data="cifar10", out="runs/x", crop_padding=-1)


def test_augmentation_strengths_reach_the_augmenter(tmp_path, monkeypatch):
    made = []

    def recording_augmenter(*args, **kwargs):
        made.append(kwargs)
        return engine_augmenter(*args, **kwargs)

    engine_augmenter = engine.Augmenter
    monkeypatch.setattr(engine, "Augmenter", recording_augmenter)
    config = TrainConfig(model="cnn_bn", data="unused", out=str(tmp_path / "run"), epochs=1, batch_size=16,
                         flip=False, rotate_degrees=0.0, translate=0.05, crop_padding=3, brightness=0.0,
                         contrast=0.1, progress=False)  # fmt: skip
    engine.train(config, dataset=tiny_dataset())
    assert made == [{"flip": False, "rotate_degrees": 0.0, "brightness": 0.0, "contrast": 0.1,
                     "translate": 0.05, "crop_padding": 3}]  # fmt: skip
