"""Table 3's question at CIFAR scale: shortcut options A, B and C on the same net."""

from __future__ import annotations

from deepres.experiments.common import Context, ensure_run, run_result, verdict, within_chance
from deepres.models.registry import default_option
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
        default = default_option(model, "shortcut")
        for option, name in _names(model).items():
            # The net's default option (A for a CIFAR net, B for an ImageNet one) is its
            # ordinary run, shared with other experiments.
            config = ctx.config(name, model, shortcut=None if option == default else option)
            runs[name] = {**run_result(ensure_run(ctx, config)), "shortcut": option}
    return {
        "runs": runs,
        "claims": claims(runs, models),
        "paper_resnet34_top1": TABLE3_RESNET34_TOP1,
    }


def _names(model: str) -> dict[str, str]:
    """The run of each option: the net's own name for its default option, else NET-OPTION."""
    default = default_option(model, "shortcut")
    return {option: model if option == default else f"{model}-{option}" for option in "ABC"}


def claims(runs: dict, models: list[str]) -> list[dict]:
    """Table 3's claims for each net: B beats A slightly, C beats B marginally."""
    # Table 3 compares test errors; with no held-out images, training errors stand in, and say so.
    held_out = all(r["test_error"] is not None for r in runs.values())
    key, kind = ("test_error", "held-out error") if held_out else ("train_error", "training error")
    out = []
    for model in models:
        ra, rb, rc = (runs[name] for name in _names(model).values())
        a, b, c = ra[key], rb[key], rc[key]
        out.append(
            verdict(
                f"{model}: projection shortcuts (B) beat zero-padding (A) slightly ({kind})",
                b < a,
                f"B {b:.2f}% vs A {a:.2f}%{within_chance(rb, ra, key)}",
            )
        )
        out.append(
            verdict(
                f"{model}: projecting every shortcut (C) beats B marginally ({kind})",
                c < b,
                f"C {c:.2f}% vs B {b:.2f}%{within_chance(rc, rb, key)}",
            )
        )
    return out
