"""One training run on all cores with spinning and with passive OpenMP waits: images/s as JSON.

    .venv/bin/python benchmarks/omp_wait_policy.py --seconds 20 --rounds 4

`make campaign` sets OMP_WAIT_POLICY=PASSIVE because spinning threads slow a step several times
over when other processes share the cores (omp-wait-policy-cpu-avx2-shared-*.json). This is
the other side of that choice: what passive waits cost a run that has the machine to itself, as
`make campaign LANES=1` runs. Run it on an idle machine. Each round runs one process per policy
(deepres's training step, as benchmarks/lanes.py times it), the order reversed every other
round; the median of each policy is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys

import torch
from lanes import run_lanes

from deepres.provenance import machine

POLICIES = ("ACTIVE", "PASSIVE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=4)
    # run_lanes (lanes.py) trains each lane at this precision.
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    # An idle machine is the point: what else ran shows in the load before the first run.
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    threads = os.cpu_count() or 1
    speeds: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    for r in range(args.rounds):
        for policy in POLICIES if r % 2 == 0 else reversed(POLICIES):
            speeds[policy].append(run_lanes(args, 1, threads, policy)[0])
    medians = {policy: statistics.median(values) for policy, values in speeds.items()}
    result = {
        "benchmark": "omp_wait_policy",
        "model": args.model,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "threads": threads,
        "seconds_per_run": args.seconds,
        "rounds": args.rounds,
        "images_per_sec": medians,
        "per_round_images_per_sec": speeds,
        "passive_over_active": medians["PASSIVE"] / medians["ACTIVE"],
        "command": shlex.join(["python", *sys.argv]),
        # Each run's own settings; the machine record below is this parent process's.
        "run_env": {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "ACTIVE or PASSIVE"},
        "load_average_at_start": load_at_start,
        "machine": machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
