"""One ResNet class for both families: the ImageNet nets (Table 1) and the CIFAR nets (Sec. 4.2)."""

from __future__ import annotations

import torch
from torch import nn

from deepres.models.blocks import BasicBlock, Bottleneck, make_shortcut


class ResNet(nn.Module):
    """conv1, then one stage per entry of `layers`, global average pool and fc (Table 1)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        widths: list[int],
        stem: str = "imagenet",
        num_classes: int = 1000,
        in_channels: int = 3,
        shortcut: str = "B",
        residual: bool = True,
        stride_in_1x1: bool = True,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.block = block
        self.shortcut = shortcut
        self.residual = residual
        self.stride_in_1x1 = stride_in_1x1
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        # Stage i is conv{i+2}_x in the paper's naming; every stage but the first halves the map.
        self.stage_names = [f"conv{i + 2}_x" for i in range(len(layers))]
        self.stages = []
        for i, (blocks, width) in enumerate(zip(layers, widths, strict=True)):
            stage = self._make_layer(width, blocks, stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
            self.stages.append(stage)
        self.feature_channels = [widths[i] * block.expansion for i in range(len(layers))]
        self.fc = nn.Linear(self.inplanes, num_classes)
        self._init_weights(zero_init_residual and residual)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * self.block.expansion
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = (
                make_shortcut(self.shortcut, self.inplanes, out_planes, s)
                if self.residual
                else None
            )
            layers.append(
                self.block(self.inplanes, planes, s, downsample, self.residual, self.stride_in_1x1)
            )
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_last_bn: bool) -> None:
        # He initialisation (the paper's [13]); BN starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            # Each residual block then starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The feature map of every stage, keyed conv2_x, conv3_x, ... (a detection backbone)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = {}
        for name, stage in zip(self.stage_names, self.stages, strict=True):
            x = stage(x)
            features[name] = x
        return features

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and the fc classifier, on the last stage's map."""
        # A mean, not AdaptiveAvgPool2d, whose CUDA backward --deterministic refuses.
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return self.forward_head(x)
