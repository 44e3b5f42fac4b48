"""Model registry: ``create(name, num_classes=...)`` builds a classifier by name.

Every registered model maps float NCHW images in [0, 1] to logits. Add your own with
``@register("name")`` on a factory taking ``num_classes`` (and optional ``in_channels``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..registry import Registry

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

#: name -> factory taking ``num_classes`` (and optional ``in_channels``, ``width``, ...)
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory under ``name``."""
    return MODELS.register(name)


def available() -> list[str]:
    return MODELS.names()


def create(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build a registered model. An unknown name raises :class:`~ibau.registry.UnknownName`
    (an ``InputError`` and a ``KeyError``) listing the known models."""
    return MODELS.get_or_raise(name)(num_classes=num_classes, **kwargs)


register("small_vgg")(SmallVGG)
register("preact_resnet18")(PreActResNet18)
register("resnet18")(ResNet18)
register("googlenet")(GoogLeNet)
register("densenet121")(DenseNet121)
