"""The model registry: one name -> constructor table that every CLI, test, export and report looks up."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from inference.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec

# CIFAR-10's per-channel training-set statistics on [0, 1] pixels: the nets trained from scratch here are CIFAR nets.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

ChannelStats = tuple[float, float, float]  # one value per RGB channel


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[..., nn.Module]  # build(num_classes, input_size, **arch_kwargs) -> nn.Module taking (N, 3, H, W)
    description: str
    mean: ChannelStats  # the normalisation (x - mean) / std of its input, per RGB channel on [0, 1] pixels
    std: ChannelStats
    input_size: tuple[int, int] = (32, 32)  # default (H, W)
    transfer: bool = False  # torchvision ImageNet architecture whose backbone takes pretrained weights


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, description: str, *, mean: ChannelStats, std: ChannelStats, input_size=(32, 32), transfer=False
):
    def decorate(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(
            name, build, description, mean=tuple(mean), std=tuple(std), input_size=tuple(input_size), transfer=transfer
        )
        return build

    return decorate


def list_models() -> list[ModelInfo]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_REGISTRY))}") from None


def build_model(name: str, num_classes: int, input_size: tuple[int, int] | None = None, **arch_kwargs) -> nn.Module:
    """A freshly initialised (random-weight) model; pretrained weights are loaded by training.transfer."""
    info = get_model_info(name)
    return info.build(num_classes, tuple(input_size or info.input_size), **arch_kwargs)


def model_spec(
    name: str,
    class_names: Sequence[str],
    input_size: tuple[int, int] | None = None,
    arch_kwargs: dict | None = None,
) -> ModelSpec:
    """The spec of a new `name` model: its registry entry's normalisation and (unless given) input size."""
    info = get_model_info(name)
    return ModelSpec(
        arch=name,
        class_names=tuple(class_names),
        input_size=tuple(input_size or info.input_size),
        mean=info.mean,
        std=info.std,
        arch_kwargs={} if arch_kwargs is None else arch_kwargs,
    )


def flat_features(features: nn.Module, input_size: tuple[int, int], in_channels: int = 3) -> int:
    """Size of `features`' flattened output, found by a dummy forward, never by hand.

    The lesson's CNNWithBatchNorm hard-codes 64*16*16; after two 2x2 pools a 32x32 input gives 64*8*8.
    """
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, *input_size)).flatten(1).shape[1]


class SimpleCNN(nn.Module):
    """The lesson's SimpleCNN (two conv blocks, dropout MLP head), on RGB input."""

    def __init__(self, num_classes: int = 10, input_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_features(self.features, input_size), 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """The lesson's LeNet-5 on RGB input (32x32 -> 28 -> 14 -> 10 -> 5)."""

    def __init__(self, num_classes: int = 10, input_size=(32, 32)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat_features(self.features, input_size), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LessonCNN(nn.Module):
    """The lesson's CNNWithBatchNorm (conv-BN-ReLU-pool x2, linear head), or its plain twin without BN."""

    def __init__(self, num_classes: int = 10, input_size=(32, 32), batch_norm: bool = True):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            # Without BN the conv keeps its bias; with BN the bias would be cancelled by the mean.
            norm = [nn.BatchNorm2d(cout)] if batch_norm else []
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(3, 32), *block(32, 64))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat_features(self.features, input_size), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model(
    "simple_cnn", "The lesson's SimpleCNN: 2 conv blocks + dropout MLP head", mean=CIFAR10_MEAN, std=CIFAR10_STD
)
def simple_cnn(num_classes: int, input_size=(32, 32)) -> nn.Module:
    return SimpleCNN(num_classes, input_size)


@register_model("lenet", "The lesson's LeNet-5 (1998), on RGB", mean=CIFAR10_MEAN, std=CIFAR10_STD)
def lenet(num_classes: int, input_size=(32, 32)) -> nn.Module:
    return LeNet(num_classes, input_size)


@register_model(
    "cnn_bn",
    "The lesson's CNNWithBatchNorm: 2 conv-BN-ReLU-pool blocks + linear head",
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
def cnn_bn(num_classes: int, input_size=(32, 32)) -> nn.Module:
    return LessonCNN(num_classes, input_size, batch_norm=True)


@register_model(
    "cnn_plain", "cnn_bn's plain twin: the same network without batch norm", mean=CIFAR10_MEAN, std=CIFAR10_STD
)
def cnn_plain(num_classes: int, input_size=(32, 32)) -> nn.Module:
    return LessonCNN(num_classes, input_size, batch_norm=False)


@register_model(
    "resnet18",
    "ResNet-18 for 32x32 inputs (3x3 stem, no early max-pool), from scratch",
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
def resnet18(num_classes: int, input_size=(32, 32)) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    # ImageNet's 7x7/2 stem and 3x3/2 max-pool would shrink 32x32 to 8x8 before the first block.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _transfer_resnet(constructor: Callable[..., nn.Module], num_classes: int) -> nn.Module:
    model = constructor()  # ImageNet architecture; weights come from training.transfer
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


@register_model(
    "resnet18_transfer",
    "torchvision ResNet-18 with ImageNet weights and a new head",
    mean=IMAGENET_MEAN,  # what the pretrained backbone was trained with
    std=IMAGENET_STD,
    input_size=(64, 64),
    transfer=True,
)
def resnet18_transfer(num_classes: int, input_size=(64, 64)) -> nn.Module:
    return _transfer_resnet(torchvision.models.resnet18, num_classes)


@register_model(
    "resnet50_transfer",
    "torchvision ResNet-50 with ImageNet weights and a new head",
    mean=IMAGENET_MEAN,  # what the pretrained backbone was trained with
    std=IMAGENET_STD,
    input_size=(64, 64),
    transfer=True,
)
def resnet50_transfer(num_classes: int, input_size=(64, 64)) -> nn.Module:
    return _transfer_resnet(torchvision.models.resnet50, num_classes)


class GlobalMaxPool(nn.Module):
    """(N, C, H, W) -> (N, C): the maximum over each channel. Written as amax rather than AdaptiveMaxPool2d(1),
    which the ONNX exporter of torch 2.11 could not translate (it exports as ReduceMax)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


def _identity_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 conv whose first filters start as the identity (airbench's dirac init): each block begins close
    to passing its input through, an implicit residual that lets a plain stack of convs train fast."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:channels_in])
    return conv


def _shift_only_norm(channels: int) -> nn.BatchNorm2d:
    """airbench's batch norm: the scale stays 1 (only the shift trains) and the running statistics follow
    the batches fast (PyTorch momentum 0.4), which suits the short runs and the weight averaging (EMA)."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class AirbenchNet(nn.Module):
    """A fast CIFAR net after Keller Jordan's airbench: a frozen 2x2 patch-whitening stem, three
    conv-pool-BN-GELU groups (convolutions starting as the identity, batch norm with a fixed scale) and a
    linear head on max-pooled features, logits scaled down.

    The stem is set from the training data by `init_from_data` (the engine calls it before training): its
    filters are the eigenvectors of the 2x2 patch covariance scaled by 1/sqrt(eigenvalue), and their
    negatives, so its output is decorrelated with unit variance. It stays frozen; its bias trains.
    """

    def __init__(self, num_classes: int = 10, input_size=(32, 32), widths=(64, 256, 256)):
        super().__init__()
        patch_dims = 3 * 2 * 2
        self.whiten = nn.Conv2d(3, 2 * patch_dims, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        layers: list[nn.Module] = [nn.GELU()]
        channels = 2 * patch_dims
        for width in widths:
            layers += [
                _identity_conv(channels, width), nn.MaxPool2d(2), _shift_only_norm(width), nn.GELU(),
                _identity_conv(width, width), _shift_only_norm(width), nn.GELU(),
            ]  # fmt: skip
            channels = width
        self.features = nn.Sequential(*layers, GlobalMaxPool())
        self.head = nn.Linear(channels, num_classes, bias=False)
        # airbench's: small initial logits, which suits label smoothing 0.2
        self.logit_scale = 1 / 9

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised training images, float (N, 3, H, W)."""
        patches = nn.functional.unfold(images.float(), kernel_size=2)  # (N, 12, L)
        patches = patches.transpose(1, 2).reshape(-1, 12)
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        # One filter per eigenvector, scaled by 1/sqrt(eigenvalue): unit variance along each direction.
        filters = eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]
        filters = filters.float().reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.whiten(x))) * self.logit_scale


@register_model(
    "airbench",
    "Fast net after airbench: frozen patch-whitening stem, 3 conv-pool-BN-GELU groups (arch kwarg widths)",
    # The whitening stem is fitted to the images after this normalisation, so any per-channel statistics
    # leave its output decorrelated with unit variance; CIFAR-10's are the ones airbench itself uses.
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
)
def airbench(num_classes: int, input_size=(32, 32), widths=(64, 256, 256)) -> nn.Module:
    return AirbenchNet(num_classes, input_size, tuple(widths))
