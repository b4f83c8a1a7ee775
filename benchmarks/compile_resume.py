"""A real run resumed eagerly and with --compile, side by side: its logged images/s as JSON.

    .venv/bin/python benchmarks/compile_resume.py RUN --seconds 110

A synthetic step (benchmarks/step_variants.py) leaves out what a real run does besides: its data
path, its logging, its checkpoints. Here the run itself is copied (the copy only: the run is not
touched) and resumed by `deepres train --resume COPY` for a fixed time, once without and once
with --compile, in turns over rounds; each session is stopped by SIGTERM, as the campaign is,
and the images/s its log windows recorded are read back. The first window of each session holds
the start (compiling, for --compile) and is left out of the median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepres.checkpoint import checkpoint_state
from deepres.provenance import machine
from deepres.report import read_metrics


def session(run: Path, flag: str, seconds: float) -> list[float]:
    """Images/s of each log window of one resumed session of a copy of run."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy)
        # The resume drops records past the checkpoint (a copy of a live run has some).
        start = checkpoint_state(copy)["iteration"]
        deepres = [sys.executable, "-m", "deepres.cli", "train", "--resume", str(copy), flag]
        child = subprocess.Popen([*deepres, "--quiet"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(seconds)
            child.send_signal(signal.SIGTERM)  # checkpoints and stops, as the campaign's runs do
            code = child.wait(timeout=300)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if code not in (0, 130):
            raise SystemExit(f"deepres train --resume {run} {flag}: exit status {code}")
        return [m["images_per_sec"] for m in read_metrics(copy) if m["iteration"] > start]


def main() -> None:
    """Resume copies of the run in turns, eager and compiled; print the medians as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run directory with a checkpoint")
    p.add_argument("--seconds", type=float, default=120, help="each session's length")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    flags = {"eager": "--no-compile", "compile": "--compile"}
    windows: dict[str, list[list[float]]] = {name: [] for name in flags}
    for r in range(args.rounds):
        for name in list(flags) if r % 2 == 0 else list(flags)[::-1]:
            windows[name].append(session(args.run, flags[name], args.seconds))
    after_start = {k: [w for got in v for w in got[1:]] for k, v in windows.items()}
    if not all(after_start.values()):
        raise SystemExit("a session logged no window after its first: raise --seconds")
    medians = {name: statistics.median(w) for name, w in after_start.items()}
    config = json.loads((args.run / "config.json").read_text())
    result = {
        "benchmark": "compile_resume",
        "run": str(args.run),
        "model": config["model"],
        "precision": config["config"].get("precision", "fp32"),
        "seconds_per_session": args.seconds,
        "rounds": args.rounds,
        "images_per_sec_median": {k: round(v, 1) for k, v in medians.items()},
        "speedup_of_compile": round(medians["compile"] / medians["eager"], 3),
        "windows_images_per_sec": {
            k: [[round(w) for w in got] for got in v] for k, v in windows.items()
        },
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
