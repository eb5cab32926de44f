"""ModelSpec: validation and the JSON round trip that checkpoints, exported files and manifests rely on."""

from __future__ import annotations

import json

import pytest

from inference.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


def test_round_trip_through_json():
    spec = ModelSpec("cnn_bn", ("cat", "dog"), (40, 48), arch_kwargs={"width": 2})
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.num_classes == 2 and again.mean == IMAGENET_MEAN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_names": ()}, "at least one class"),
        ({"class_names": ("a", "a")}, "unique"),
        ({"input_size": (0, 32)}, "input_size"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_invalid_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**{"arch": "x", "class_names": ("a",), **kwargs})


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown model spec fields"):
        ModelSpec.from_dict({"arch": "x", "class_names": ["a"], "colour": "blue"})


def test_a_spec_keeps_the_normalisation_it_records():
    recorded = {"arch": "cnn_bn", "class_names": ["a"], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert (ModelSpec.from_dict(recorded).mean, ModelSpec.from_dict(recorded).std) == (IMAGENET_MEAN, IMAGENET_STD)
    unstated = ModelSpec.from_dict({"arch": "cnn_bn", "class_names": ["a"]})  # no statistics: ImageNet's
    assert (unstated.mean, unstated.std) == (IMAGENET_MEAN, IMAGENET_STD)
    cifar = ModelSpec("cnn_bn", ("a",), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    assert ModelSpec.from_dict(json.loads(json.dumps(cifar.to_dict()))) == cifar
