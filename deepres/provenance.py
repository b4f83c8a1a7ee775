"""Where a result was made: the machine, the torch version and the git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

SPEED_FLAGS = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"}


def machine() -> dict:
    """The machine, torch version and git commit a result was made with."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("cpu MHz"):
                # A value some virtual machines garble must not cost the flags read after it.
                try:
                    mhz = float(line.split(":", 1)[1])
                except ValueError:
                    mhz = None
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if flags:
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        # The vector units a CPU speed depends on: the same torch runs 2x apart across these.
        "cpu_flags": sorted(flags & SPEED_FLAGS),
        "cpu_count": os.cpu_count(),
        "cpu_mhz": mhz,
        "torch_threads": torch.get_num_threads(),
        # Whatever else shared the cores when the record was made (the measured job included),
        # and how OpenMP threads were told to wait: both move CPU timings by several times.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_"))},
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _git(args: list[str], where: Path | None) -> str | None:
    """A git command's output, run in where (deepres's own folder by default); None outside git."""
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            cwd=where or Path(__file__).parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit(where: Path | None = None) -> str | None:
    """The commit of the checkout deepres runs from, or None outside git."""
    out = _git(["rev-parse", "HEAD"], where)
    return (out.strip() or None) if out is not None else None


def git_dirty(where: Path | None = None) -> bool | None:
    """Whether deepres's code (the package and benchmarks/) differs from that commit, or None.

    Results and reports written into the checkout are no change to the code that made them,
    shipped weights included (`make land` publishes them, then writes reports). An edited
    script under tests/ is not seen here.
    """
    # No optional locks: a campaign's runs call this while git may be committing beside them.
    # Untracked files "normal": a user's status.showUntrackedFiles=no would hide new modules.
    paths = [".", "../benchmarks", ":(exclude)weights"]
    out = _git(
        ["--no-optional-locks", "status", "--porcelain", "--untracked-files=normal", "--", *paths],
        where,
    )
    return None if out is None else bool(out.strip())
