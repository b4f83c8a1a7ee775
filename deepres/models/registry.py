"""Every net of the paper by name: create_model("resnet56"), list_models()."""

from __future__ import annotations

import inspect
from functools import partial

from torch import nn

from deepres.models.cifar import cifar_resnet
from deepres.models.imagenet import imagenet_resnet

CIFAR_RESNETS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAINS = (20, 32, 44, 56, 110)
IMAGENET_RESNETS = (18, 34, 50, 101, 152)
IMAGENET_PLAINS = (18, 34)

MODELS: dict[str, partial] = {
    **{f"resnet{d}": partial(cifar_resnet, d) for d in CIFAR_RESNETS},
    **{f"plain{d}": partial(cifar_resnet, d, residual=False) for d in CIFAR_PLAINS},
    **{f"resnet{d}": partial(imagenet_resnet, d) for d in IMAGENET_RESNETS},
    **{f"plain{d}": partial(imagenet_resnet, d, residual=False) for d in IMAGENET_PLAINS},
}


def list_models() -> list[str]:
    """Names of every registered net, CIFAR nets first, each family by depth."""
    return list(MODELS)


def _builder(name: str) -> partial:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def create_model(name: str, **options) -> nn.Module:
    """Build a registered net; options go to its builder (shortcut, num_classes, ...)."""
    return _builder(name)(**options)


def check_options(name: str, options: dict) -> None:
    """A ValueError unless name is a registered net and its builder takes these options."""
    unknown = sorted(set(options) - set(inspect.signature(_builder(name)).parameters))
    if unknown:
        raise ValueError(f"{name} takes no option {', '.join(map(repr, unknown))}")


def default_option(name: str, option: str) -> object:
    """What a registered net's builder takes for an option left out (shortcut: "A" or "B")."""
    return inspect.signature(_builder(name)).parameters[option].default


def model_family(name: str) -> str:
    """'cifar' or 'imagenet': which of the paper's two families a registered net belongs to."""
    return "cifar" if _builder(name).func is cifar_resnet else "imagenet"
