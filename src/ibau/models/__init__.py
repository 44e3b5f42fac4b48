"""Model registry: ``create(name, num_classes=...)`` builds a classifier by name.

Every registered model maps float NCHW images in [0, 1] to logits. Add your own with
``@register("name")`` on a factory taking ``num_classes`` (and optional ``in_channels``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .cifar_nets import DenseNet121, GoogLeNet, ResNet18
from .features import features
from .normalize import Normalized
from .preact_resnet import PreActResNet18
from .vgg import SmallVGG

__all__ = [
    "MODELS",
    "register",
    "create",
    "available",
    "features",
    "SmallVGG",
    "PreActResNet18",
    "ResNet18",
    "GoogLeNet",
    "DenseNet121",
    "Normalized",
]

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return deco


def available() -> list[str]:
    return sorted(MODELS)


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model. Raises ``KeyError`` naming the known models."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(available())}") from None
    return factory(num_classes=num_classes, **kwargs)


register("small_vgg")(SmallVGG)
register("preact_resnet18")(PreActResNet18)
register("resnet18")(ResNet18)
register("googlenet")(GoogLeNet)
register("densenet121")(DenseNet121)
