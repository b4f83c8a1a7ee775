"""The paper's experiments, one module each; `reproduce` runs one and writes its report."""

from __future__ import annotations

import re
import time
from pathlib import Path

from deepres.data import available_splits, open_dataset
from deepres.experiments import degradation, responses, shortcuts, table6
from deepres.experiments.common import BUDGETS, Context
from deepres.provenance import machine
from deepres.report import write_report

EXPERIMENTS = {
    "degradation": degradation,
    "responses": responses,
    "table6": table6,
    "shortcuts": shortcuts,
}


def reproduce(
    experiment: str,
    data: str,
    budget: str = "short",
    out: str | Path | None = None,
    runs: str | Path | None = None,
    models: list[str] | None = None,
    val_split: int | None = None,
    device: str = "auto",
    progress: bool = True,
    command: str = "",
    compile: bool = False,
    cuda_graph: bool = True,
) -> dict:
    """Run one experiment (training or reusing its runs) and write DIR/report.md and friends."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; known: {', '.join(BUDGETS)}")
    module = EXPERIMENTS[experiment]
    if val_split is None:
        # The paper validates on a 5k hold-out when there is no test split to use (Sec. 4.2).
        has_test = "test" in available_splits(data)
        val_split = 0 if has_test else min(5000, len(open_dataset(data).labels) // 10)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data).name).strip("-")
    ctx = Context(
        data=data,
        budget=BUDGETS[budget],
        runs_dir=Path(runs or f"runs/reproduce-{slug}-{budget}"),
        val_split=val_split,
        device=device,
        progress=progress,
        compile=compile,
        cuda_graph=cuda_graph,
    )
    # Read before training: the commit of the code this process runs, not of a later checkout.
    where = machine()
    start = time.perf_counter()
    result = module.run(ctx, models or module.default_models(budget))
    result = {
        "experiment": experiment,
        "budget": budget,
        "iters": ctx.budget.iters,
        "data": data,
        "val_split": val_split,
        "runs_dir": str(ctx.runs_dir),
        "command": command,
        "machine": where,
        "wall_seconds": time.perf_counter() - start,
        "training_seconds": sum(r["seconds"] for r in result["runs"].values()),
        **result,
    }
    write_report(result, Path(out or f"reports/{experiment}-{budget}"))
    return result
