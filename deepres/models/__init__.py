"""The nets of the paper: blocks, the ResNet class, the registry and their statistics."""

from deepres.models.blocks import BasicBlock, Bottleneck, ZeroPadShortcut
from deepres.models.cifar import cifar_resnet
from deepres.models.imagenet import imagenet_resnet
from deepres.models.registry import create_model, list_models, model_family
from deepres.models.resnet import ResNet
from deepres.models.stats import count_depth, count_macs, count_params, model_stats

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ZeroPadShortcut",
    "cifar_resnet",
    "count_depth",
    "count_macs",
    "count_params",
    "create_model",
    "imagenet_resnet",
    "list_models",
    "model_family",
    "model_stats",
]
