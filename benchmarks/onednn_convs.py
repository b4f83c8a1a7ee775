"""Each convolution pass of a deepres training step as oneDNN runs it: kernel, ms, GFLOP/s, JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onednn_convs.py --model resnet56

The step (channels_last, SGD, as `deepres train` runs it on a CPU) runs in a child process with
ONEDNN_VERBOSE=1; the last of --steps steps is read back, and its convolutions are grouped by
pass (forward, backward data, backward weights) and shape. Each group's rate is its MACs x 2
over its time, so the passes of one shape compare directly: on an AVX2 CPU the weight gradient
runs in another kernel than the other two passes, and this shows what that costs. Then, for each
3x3 stride-1 shape of the step, the weight gradient alone is timed three ways (median of
--repeats): oneDNN in channels_last (what the step does), oneDNN in NCHW, and im2col + one
matmul, the textbook alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from deepres import create_model
from deepres.provenance import machine

MARK = "=== last step"
# oneDNN's descriptor of a 2-D convolution: mb128_ic16oc16_ih32oh32kh3sh1..._iw32ow32kw3...
SHAPE = re.compile(r"mb(\d+)_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\D.*_iw\d+ow(\d+)kw(\d+)")


def child(model_name: str, batch_size: int, steps: int) -> None:
    """Run the training steps; oneDNN prints each primitive it executes."""
    torch.manual_seed(0)
    model = create_model(model_name).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    for step in range(steps):
        if step == steps - 1:
            print(MARK, flush=True)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sys.stdout.flush()


def gflop(desc: str) -> float:
    """The FLOPs (2 x MACs) of one convolution pass, in GFLOP."""
    mb, ic, oc, oh, kh, ow, kw = map(int, SHAPE.search(desc).groups())
    return 2 * mb * ic * oc * oh * ow * kh * kw / 1e9


def parse(lines: list[str]) -> list[dict]:
    """The convolutions of the last step, grouped by pass, kernel and shape."""
    groups = defaultdict(lambda: [0, 0.0])
    for line in lines[lines.index(MARK) + 1 :]:
        f = line.split(",")
        if len(f) < 10 or f[3] != "exec" or f[5] != "convolution":
            continue
        group = groups[(f[7], f[6], f[-2])]  # pass, kernel, shape
        group[0] += 1
        group[1] += float(f[-1])
    rows = []
    for (pass_, kernel, desc), (count, ms) in groups.items():
        rows.append(
            {
                "pass": pass_,
                "kernel": kernel,
                "shape": desc,
                "count": count,
                "ms": round(ms, 2),
                "ms_each": round(ms / count, 3),
                "gflop_per_sec": round(gflop(desc) * count / (ms / 1e3), 1),
            }
        )
    return sorted(rows, key=lambda r: -r["ms"])


def weight_gradient_ways(batch: int, channels: int, size: int, repeats: int) -> dict:
    """ms of one 3x3 stride-1 weight gradient: oneDNN channels_last and NCHW, im2col + matmul."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    grad = torch.randn(batch, channels, size, size)
    weight = torch.randn(channels, channels, 3, 3)
    mask = [False, True, False]  # the weight's gradient only

    def onednn(x, grad, weight):
        args = (None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
        return lambda: torch.ops.aten.convolution_backward(grad, x, weight, *args)[1]

    def im2col():
        cols = F.unfold(x, 3, padding=1).transpose(1, 2).flatten(0, 1)  # [N*H*W, C*9]
        rows = grad.flatten(2).transpose(0, 1).flatten(1)  # [C, N*H*W]
        return (rows @ cols).view_as(weight)

    cl = torch.channels_last
    ways = {
        "onednn_channels_last": onednn(
            x.to(memory_format=cl), grad.to(memory_format=cl), weight.to(memory_format=cl)
        ),
        "onednn_nchw": onednn(x, grad, weight),
        "im2col_matmul": im2col,
    }
    reference = ways["onednn_nchw"]()
    out = {}
    for name, way in ways.items():
        torch.testing.assert_close(way(), reference, rtol=1e-3, atol=1e-2)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            way()
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times) * 1e3, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="the last one is read")
    parser.add_argument("--repeats", type=int, default=7, help="timings of each weight gradient")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.batch_size, args.steps)
        return
    command = [sys.executable, __file__, "--child", "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    out = subprocess.run(
        command, env={**os.environ, "ONEDNN_VERBOSE": "1"}, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr.strip().splitlines()[-1])
    rows = parse(out.stdout.splitlines())
    by_pass = defaultdict(float)
    for row in rows:
        by_pass[row["pass"]] += row["ms"]
    shapes = sorted(
        {tuple(map(int, SHAPE.search(r["shape"]).groups())) for r in rows if "sh1" in r["shape"]}
    )
    weight_gradient = {
        f"c{ic}_{oh}x{ow}": weight_gradient_ways(mb, ic, oh, args.repeats)
        for mb, ic, oc, oh, kh, ow, kw in shapes
        if ic == oc and kh == kw == 3
    }
    print(
        json.dumps(
            {
                "benchmark": "onednn_convs",
                "model": args.model,
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "command": "python benchmarks/onednn_convs.py " + " ".join(sys.argv[1:]),
                "ms_by_pass": {k: round(v, 1) for k, v in by_pass.items()},
                "convolutions": rows,
                "weight_gradient_ms": weight_gradient,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
