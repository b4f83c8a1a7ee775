"""One training run on all cores, or one run per core side by side: total images/s as JSON.

    .venv/bin/python benchmarks/lanes.py --model resnet20 --seconds 40 --rounds 2
    .venv/bin/python benchmarks/lanes.py --model resnet56 --precision bf16

A campaign of many nets (issue 9) can run them one after another with every core each, or
several at once with fewer threads each. Which gives more images/s in total depends on how well
one step scales over threads on the machine. Each lane is a separate process running deepres's
training step (channels_last SGD, batch 128, CIFAR-shaped) for a fixed time after a warm-up; the
two layouts take turns in rounds, and the median of each is reported. `--precision bf16` runs
the step under bf16 autocast, as deepres trains on a CPU with bf16 units.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from deepres import create_model
from deepres.provenance import machine


def lane(model_name: str, batch_size: int, seconds: float, warmup: int, precision: str) -> float:
    """Images/s of training steps in this process, timed for `seconds` after `warmup` steps."""
    # As deepres trains with --precision bf16: the forward and loss under bf16 autocast.
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(0)
    model = create_model(model_name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        with amp:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return steps * batch_size / (time.perf_counter() - start)


def run_lanes(
    args: argparse.Namespace, lanes: int, threads: int, wait_policy: str = "PASSIVE"
) -> list[float]:
    """Start `lanes` processes of `threads` threads each at once; their images/s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": wait_policy}
    command = [sys.executable, __file__, "--lane", "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--seconds", str(args.seconds)]
    command += ["--precision", args.precision]
    children = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(lanes)
    ]
    return [float(child.communicate()[0]) for child in children]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.lane:
        print(lane(args.model, args.batch_size, args.seconds, warmup=5, precision=args.precision))
        return
    cores = os.cpu_count() or 1
    layouts = {"one_run_all_cores": (1, cores), "one_run_per_core": (cores, 1)}
    totals: dict[str, list[float]] = {name: [] for name in layouts}
    per_lane: dict[str, list[list[float]]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, (lanes, threads) in layouts.items():
            speeds = run_lanes(args, lanes, threads)
            per_lane[name].append(speeds)
            totals[name].append(sum(speeds))
    medians = {name: statistics.median(values) for name, values in totals.items()}
    result = {
        "benchmark": "lanes",
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "seconds_per_lane": args.seconds,
        "rounds": args.rounds,
        "total_images_per_sec": medians,
        "per_round_totals": totals,
        "per_round_lanes": per_lane,
        "ratio_per_core_over_all_cores": medians["one_run_per_core"] / medians["one_run_all_cores"],
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
