"""Table 6: CIFAR-10 error of ResNet-20..110 (and 1202 at the full budget) beside the paper's."""

from __future__ import annotations

import itertools

from deepres.experiments.common import (
    Context,
    ensure_run,
    no_held_out,
    not_judged,
    run_result,
    verdict,
    within_chance,
)
from deepres.paper import TABLE6_ERROR
from deepres.report import beside_table6


def default_models(budget: str) -> list[str]:
    """The nets of Table 6; ResNet-1202 only at the full budget."""
    names = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    return names + (["resnet1202"] if budget == "full" else [])


def run(ctx: Context, models: list[str]) -> dict:
    """Train (or reuse) each net; return our error, the paper's and the gap."""
    runs = {name: run_result(ensure_run(ctx, ctx.config(name, name))) for name in models}
    table = []
    for name, r in runs.items():
        paper, gap, note = beside_table6(name, r)
        table.append(
            {
                "model": name,
                "params": r["params"],
                "ours": r["test_error"],
                "eval_split": r["eval_split"],
                "paper": paper,
                "gap": gap,
                "note": note,
            }
        )
    return {"runs": runs, "table": table, "claims": claims(runs)}


def claims(runs: dict) -> list[dict]:
    """Table 6's claim, judged on the nets that were run: the error falls with depth."""
    ordered = [n for n in TABLE6_ERROR if n in runs and n != "resnet1202"]
    if len(ordered) < 2:
        return []
    # With no held-out images (every training image trained on) the claim is judged on the
    # training error, and says so.
    held_out = all(runs[n]["test_error"] is not None for n in ordered)
    key, kind = ("test_error", "error") if held_out else ("train_error", "training error")
    errors = [runs[n][key] for n in ordered]
    notes, close = [], {}
    for a, b in itertools.pairwise(ordered):
        note = within_chance(runs[a], runs[b], key)
        close[a, b] = bool(note)
        if note:
            notes.append(f"; {a} to {b}{note[1:]}")
    falls = {(a, b): runs[b][key] < runs[a][key] for a, b in itertools.pairwise(ordered)}
    # A yes within chance where any step is; a no where every step that rises is.
    rises = [step for step, fell in falls.items() if not fell]
    chance = all(close[s] for s in rises) if rises else any(close.values())
    untested = (
        []
        if held_out
        else [
            not_judged(
                f"test error falls at each step of depth from {ordered[0]} to {ordered[-1]} "
                "(Table 6 itself)",
                no_held_out([runs[n] for n in ordered]),
            )
        ]
    )
    return [
        verdict(
            # At every step, as Table 6's column does from 20 to 110 layers: not the two ends
            # alone, which a net in the middle could contradict.
            f"{kind} falls at each step of depth from {ordered[0]} to {ordered[-1]}",
            not rises,
            ", ".join(f"{n} {e:.2f}%" for n, e in zip(ordered, errors, strict=True))
            + "".join(notes),
            chance,
        )
    ] + untested
