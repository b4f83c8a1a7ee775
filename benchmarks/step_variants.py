"""The CPU training step, eager and compiled, measured side by side: images/s as JSON.

    .venv/bin/python benchmarks/step_variants.py --model resnet20 --rounds 5

Each variant is a full SGD step of deepres's net on a CIFAR-shaped batch. The variants take
turns in rounds (A B C, A B C, ...) so that a load that comes and goes on the machine falls on
all of them alike, the order reversed every other round; the median over rounds is reported,
after a warm-up that includes compiling. `--clock cpu` times each round by the process's CPU
time instead of the wall clock: on a machine shared with other jobs (the campaign's lanes) it
leaves out the time the benchmark waits for a core, so with OMP_NUM_THREADS=1 it still compares
single-thread variants fairly.
- eager: the default training step (channels_last, as `deepres train` runs it)
- eager_nchw: the same in the contiguous layout
- eager_pool: the same with option A subsampling by a 1x1 average pool instead of the slice
  x[:, :, ::2, ::2]: equal values, but a gradient that stays channels_last (a lead that
  measured inside the noise, README "Performance")
- compile_model: torch.compile of the net alone, as `deepres train --compile` does
- compile_loss: torch.compile of the net and the loss together, the form a synthetic
  benchmark usually takes
- eager_bf16: the eager step under bf16 autocast, as `--precision bf16` trains (emulated, and
  far slower, on a CPU without avx512_bf16 or amx_bf16)
- compile_model_bf16, compile_loss_bf16: the two compiled forms under bf16 autocast, as
  `--compile --precision bf16` trains
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from deepres import create_model
from deepres.models.blocks import ZeroPadShortcut
from deepres.provenance import machine

VARIANTS = (
    "eager",
    "eager_nchw",
    "eager_pool",
    "compile_model",
    "compile_loss",
    "eager_bf16",
    "compile_model_bf16",
    "compile_loss_bf16",
)


class PoolShortcut(ZeroPadShortcut):
    """Option A subsampling by a 1x1 pool, whose backward keeps the channels_last layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, 1, self.stride)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


def make_step(variant: str, model_name: str, batch_size: int):
    """A closure running one training step of the variant, and its input batch."""
    torch.manual_seed(0)
    channels_last = variant != "eager_nchw"
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(model_name).to(memory_format=layout)
    if variant == "eager_pool":
        for block in model.modules():
            if isinstance(block, ZeroPadShortcut):
                block.__class__ = PoolShortcut
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch_size,))
    net = torch.compile(model) if variant.startswith("compile_model") else model
    bf16 = variant.endswith("_bf16")

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return F.cross_entropy(net(x), y)

    forward = torch.compile(loss_of) if variant.startswith("compile_loss") else loss_of

    def step() -> None:
        loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    """Time every variant in alternating rounds and print the medians as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    variants = args.variants.split(",")
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    steps, warmup = {}, {}
    for v in variants:
        steps[v] = make_step(v, args.model, args.batch_size)
        start = time.perf_counter()
        for _ in range(3):
            steps[v]()
        warmup[v] = time.perf_counter() - start
    rates: dict[str, list[float]] = {v: [] for v in variants}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            start = clock()
            for _ in range(args.steps):
                steps[v]()
            rates[v].append(args.steps * args.batch_size / (clock() - start))
    medians = {v: statistics.median(r) for v, r in rates.items()}
    print(
        json.dumps(
            {
                "benchmark": "step_variants",
                "model": args.model,
                "batch_size": args.batch_size,
                "steps_per_round": args.steps,
                "rounds": args.rounds,
                "clock": args.clock,
                "threads": torch.get_num_threads(),
                "images_per_sec": {v: round(m, 1) for v, m in medians.items()},
                "relative_to_eager": {
                    v: round(m / medians["eager"], 3)
                    for v, m in medians.items()
                    if "eager" in rates
                },
                "rounds_images_per_sec": {v: [round(x) for x in r] for v, r in rates.items()},
                "warmup_seconds": {v: round(s, 1) for v, s in warmup.items()},
                "machine": machine(),
                "command": shlex.join(["python", *sys.argv]),
                # What else shared the cores before the benchmark itself loaded them.
                "load_average_at_start": load_at_start,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
