"""Where a deepres training step spends its time: torch.profiler totals by kind, as JSON.

    .venv/bin/python benchmarks/profile_train.py --model resnet20 --iters 20
    .venv/bin/python benchmarks/profile_train.py --model resnet56 --precision bf16

Runs deepres's own data path (device-resident uint8 images, batched crop and flip) and step
on random CIFAR-shaped data; the split is by the self time of each operator. The convolutions'
rate (their forward and backward FLOPs from PyTorch's flop counter over their profiled time)
says how close the step is to the CPU's peak: with OMP_NUM_THREADS=1, compare it with one
core's FMA peak (clock x FLOPs per cycle). `--precision bf16` runs the forward and loss under
bf16 autocast, as deepres trains on a CPU with bf16 units; its casts (dtype copies, the data
path's uint8 to float among them) are their own kind.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from deepres import create_model
from deepres.data.loader import BatchStream, Preprocess
from deepres.provenance import machine

# First match wins: the optimizer's _foreach_add_ must not count as a residual addition, nor
# the fc's aten::addmm (the head comes before the additions for that).
KINDS = {
    "optimizer": ("_foreach", "sgd", "optimizer"),
    "convolution": ("conv", "mkldnn_convolution"),
    "batch_norm": ("batch_norm",),
    "loss_and_head": (
        "cross_entropy",
        "log_softmax",
        "nll_loss",
        "addmm",
        "aten::mm",
        "mean",
        "avg_pool",
        "argmax",
    ),
    "relu_and_add": ("relu", "threshold", "aten::add"),
    "casts": ("_to_copy", "aten::to", "copy_"),
    "data": (
        "index",
        "pad",
        "randint",
        "rand",
        "randperm",
        "where",
        "arange",
        "div",
        "sub",
        "contiguous",
        "clone",
    ),
}


def kind_of(name: str) -> str:
    """Which kind of work an operator name belongs to."""
    name = name.lower()
    for kind, keys in KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "other"


def main() -> None:
    """Profile a few training steps and print seconds per kind of work."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    model = create_model(args.model).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    stream = BatchStream(
        images, labels, Preprocess.fit(images), args.batch_size, seed=0, channels_last=True
    )

    def step(i: int) -> None:
        x, y = stream.batch(i)
        with amp:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(3):
        step(i)
    with FlopCounterMode(display=False) as counter:
        step(3)
    conv_flops = sum(
        n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op)
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(args.iters):
            step(4 + i)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    print(
        json.dumps(
            {
                "model": args.model,
                "iters": args.iters,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "seconds_per_step": whole / args.iters,
                "convolution_gflop_per_sec": round(
                    conv_flops * args.iters / totals["convolution"] / 1e9, 1
                ),
                "share": {
                    k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
                },
                "machine": machine(),
                "command": shlex.join(["python", *sys.argv]),
                # What else shared the cores before the profile itself loaded them.
                "load_average_at_start": load_at_start,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
