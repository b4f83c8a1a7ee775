"""Where a CUDA training step of a CIFAR net spends its time: wall time against GPU kernel time.

The step is deepres's on a GPU: channels_last, bf16 autocast, SGD with momentum and weight
decay, batch 128 of random images already on the device (no data path), launched kernel by
kernel (eager) and replayed as one CUDA graph (deepres.train.GraphedStep, what train() runs on
one GPU), side by side. Wall time is the mean over 100 steps after 30 of warm-up; GPU kernel
time is the profiler's total over the kernels of 10 more eager steps. Where the wall time is
well above the kernel time, the GPU waits for the host to launch work. Prints one JSON line per
net and the profiler's table of the busiest kernels.

    python benchmarks/cuda_step.py resnet56 resnet20
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from deepres.models import create_model
from deepres.train import GraphedStep


def measure(name: str) -> dict:
    """Wall and GPU kernel milliseconds per training step of one net, eager and graphed."""
    model = create_model(name).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(128, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    graphed = GraphedStep(model, opt, bf16=True)
    wall = timed(step)
    wall_graphed = timed(lambda: graphed(x, y, 0.1))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernels alone: the operator rows carry their kernels' time too and would count it twice,
    # and a user annotation on the GPU's timeline spans kernels already counted.
    kernels = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    gpu = sum(e.self_device_time_total for e in kernels) / 10 / 1e3
    print(events.table(sort_by="self_device_time_total", row_limit=12), file=sys.stderr)
    return {
        "model": name,
        "wall_ms": wall * 1e3,
        "gpu_kernel_ms": gpu,
        "gpu_busy": gpu / (wall * 1e3),
        "kernels_per_step": sum(e.count for e in kernels) / 10,
        "images_per_sec": 128 / wall,
        "graphed_wall_ms": wall_graphed * 1e3,
        "graphed_images_per_sec": 128 / wall_graphed,
        "graphed_speedup": wall / wall_graphed,
    }


def timed(step) -> float:
    """Mean seconds a step over 100 after 30 of warm-up."""
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 100


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("cuda_step.py: no CUDA device")
    torch.backends.cudnn.benchmark = True
    for name in sys.argv[1:] or ["resnet56"]:
        print(json.dumps(measure(name)), flush=True)


if __name__ == "__main__":
    main()
