"""Depth, parameters and multiply-accumulates of a net, from PyTorch's own flop counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters."""
    return sum(p.numel() for p in model.parameters())


def count_depth(model: nn.Module) -> int:
    """Weighted layers as the paper counts them: convs and fc, shortcut projections excluded."""
    return sum(
        1
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and ".downsample." not in f".{name}."
    )


def count_macs(model: nn.Module, input_size: list[int]) -> int:
    """Multiply-accumulates (the paper's "FLOPs") of one forward pass of one image."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    # The counter reports a multiply-add as two floating-point operations.
    return counter.get_total_flops() // 2


def model_stats(name: str, model: nn.Module, input_size: list[int] | None = None) -> dict:
    """name, depth, params, macs and input_size of a built net."""
    size = list(input_size or model.default_input_size)
    return {
        "name": name,
        "depth": count_depth(model),
        "params": count_params(model),
        "macs": count_macs(model, size),
        "input_size": size,
    }
