"""The CIFAR-10 nets of Sec. 4.2: depth 6n+2, maps of 32/16/8 with 16/32/64 filters."""

from __future__ import annotations

from deepres.models.blocks import BasicBlock
from deepres.models.resnet import ResNet


def cifar_resnet(
    depth: int,
    residual: bool = True,
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: str = "A",
    width: int = 16,
    zero_init_residual: bool = False,
) -> ResNet:
    """A CIFAR net of the given depth (6n+2), residual or plain; option A as in the paper."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR nets have depth 6n+2 (20, 32, 44, 56, 110, 1202), got {depth}")
    n = (depth - 2) // 6
    model = ResNet(
        BasicBlock,
        [n, n, n],
        [width, 2 * width, 4 * width],
        stem="cifar",
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut=shortcut,
        residual=residual,
        zero_init_residual=zero_init_residual,
    )
    model.default_input_size = [in_channels, 32, 32]
    return model
