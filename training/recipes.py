"""Named training recipes: presets of TrainConfig fields that `train --recipe NAME` starts from.

A recipe is a starting point, not a lock: any flag given on the command line overrides the recipe's value.
The numbers behind each recipe (what it reached, on which machine, in how long) are in
benchmarks/results/training.md.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from training.config import ConfigError

# Only flip and a padded random crop: the small, short-trained nets here underfit with the lesson's full set.
_LIGHT_AUGMENTATION = MappingProxyType(
    {"flip": True, "crop_padding": 2, "rotate_degrees": 0.0, "translate": 0.0, "brightness": 0.0, "contrast": 0.0}
)  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    settings: Mapping[str, Any]  # TrainConfig field -> value; never data or out


# airbench94's training ingredients, shared by the airbench recipes (see benchmarks/results/training.md).
_AIRBENCH_TRAINING: dict[str, Any] = dict(
    optimizer="sgd",
    momentum=0.85,
    nesterov=True,
    schedule="onecycle",
    label_smoothing=0.2,
    bn_bias_lr_scale=16.0,
    ema=True,
    ema_decay=0.99,
    tta=True,
    augment=True,
    # bfloat16 training steps where the hardware has it (CUDA, AMX or AVX512-BF16 CPUs), float32 elsewhere.
    amp=True,
    **_LIGHT_AUGMENTATION,
)


def _recipe(name: str, description: str, **settings: Any) -> Recipe:
    return Recipe(name, description, MappingProxyType(settings))


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        _recipe(
            "quick",
            "85% in under 5 minutes on a 2-core CPU with bfloat16 (AMX): a narrow airbench net, 7 epochs",
            model="airbench",
            arch_kwargs={"widths": [32, 64, 128]},
            epochs=7,
            batch_size=256,
            lr=0.4,
            weight_decay=1e-3,
            warmup_epochs=0.2,
            **_AIRBENCH_TRAINING,
        ),
        _recipe(
            "lesson",
            "the lesson's exercise (cnn_bn, 10 epochs) tuned for this tiny net: light augmentation, one-cycle",
            model="cnn_bn",
            epochs=10,
            batch_size=128,
            optimizer="sgd",
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            schedule="onecycle",
            warmup_epochs=1.0,
            label_smoothing=0.1,
            augment=True,
            **_LIGHT_AUGMENTATION,
        ),
        _recipe(
            "best",
            "airbench at full width (64, 256, 256) for the 93% target: 20 epochs, about 35 minutes of training on 2 cores",
            model="airbench",
            arch_kwargs={"widths": [64, 256, 256]},
            epochs=20,
            batch_size=512,
            lr=0.75,
            weight_decay=1.3e-3,
            warmup_epochs=0.5,
            **_AIRBENCH_TRAINING,
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None


def apply_recipe(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """TrainConfig keyword arguments: the recipe's settings, overridden by the `given` ones, plus recipe=name."""
    settings = dict(get_recipe(name).settings)
    if given.get("model", settings["model"]) != settings["model"]:
        # The recipe's architecture arguments belong to its own model.
        settings.pop("arch_kwargs", None)
    if "arch_kwargs" in settings:
        # A copy: the preset's lists must not be shared with a run's config.
        settings["arch_kwargs"] = copy.deepcopy(settings["arch_kwargs"])
    return {**settings, **given, "recipe": name}
