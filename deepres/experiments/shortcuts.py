"""Table 3's question at CIFAR scale: shortcut options A, B and C on the same net."""

from __future__ import annotations

from deepres.experiments.common import Context, ensure_run, run_result, verdict
from deepres.paper import TABLE3_RESNET34_TOP1


def default_models(budget: str) -> list[str]:
    """The net whose shortcuts are compared."""
    return ["resnet20"]


def run(ctx: Context, models: list[str]) -> dict:
    """Train one net with each option; the option-A run is the ordinary run of that net."""
    plain = [m for m in models if m.startswith("plain")]
    if plain:
        raise ValueError(f"{plain[0]}: a plain net has no shortcuts to compare")
    runs = {}
    for model in models:
        for option in "ABC":
            # Option A is each CIFAR net's default, so its run is shared with other experiments.
            name = model if option == "A" else f"{model}-{option}"
            config = ctx.config(name, model, shortcut=None if option == "A" else option)
            runs[name] = {**run_result(ensure_run(ctx, config)), "shortcut": option}
    return {
        "runs": runs,
        "claims": claims(runs, models),
        "paper_resnet34_top1": TABLE3_RESNET34_TOP1,
    }


def claims(runs: dict, models: list[str]) -> list[dict]:
    """Table 3's claims for each net: B beats A slightly, C beats B marginally."""
    # Table 3 compares test errors; with no held-out images, training errors stand in, and say so.
    held_out = all(r["test_error"] is not None for r in runs.values())
    key, kind = ("test_error", "held-out error") if held_out else ("train_error", "training error")
    out = []
    for model in models:
        a, b, c = (runs[n][key] for n in (model, f"{model}-B", f"{model}-C"))
        out.append(
            verdict(
                f"{model}: projection shortcuts (B) beat zero-padding (A) slightly ({kind})",
                b < a,
                f"B {b:.2f}% vs A {a:.2f}%",
            )
        )
        out.append(
            verdict(
                f"{model}: projecting every shortcut (C) beats B marginally ({kind})",
                c < b,
                f"C {c:.2f}% vs B {b:.2f}%",
            )
        )
    return out
