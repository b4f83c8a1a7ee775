"""The ImageNet nets of Table 1 (224x224 input, conv2_x..conv5_x)."""

from __future__ import annotations

from deepres.models.blocks import BasicBlock, Bottleneck
from deepres.models.resnet import ResNet

STAGES = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def imagenet_resnet(
    depth: int,
    residual: bool = True,
    num_classes: int = 1000,
    in_channels: int = 3,
    shortcut: str = "B",
    stride_in_1x1: bool = True,
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """An ImageNet net of Table 1; stride_in_1x1=True is the paper's v1, False is v1.5."""
    if depth not in STAGES:
        raise ValueError(f"ImageNet nets have depth {sorted(STAGES)}, got {depth}")
    block, layers = STAGES[depth]
    model = ResNet(
        block,
        layers,
        [width, 2 * width, 4 * width, 8 * width],
        stem="imagenet",
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut=shortcut,
        residual=residual,
        stride_in_1x1=stride_in_1x1,
        zero_init_residual=zero_init_residual,
    )
    model.default_input_size = [in_channels, 224, 224]
    return model
