"""Fig. 6: plain nets get worse with depth, ResNets better (training and test error)."""

from __future__ import annotations

from deepres.experiments.common import (
    Context,
    ensure_run,
    no_held_out,
    not_judged,
    run_result,
    verdict,
    within_chance,
)

PLAIN = ["plain20", "plain32", "plain44", "plain56"]
RESIDUAL = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def default_models(budget: str) -> list[str]:
    """The nets of Fig. 6; ResNet-1202 only at the full budget."""
    return PLAIN + RESIDUAL + (["resnet1202"] if budget == "full" else [])


def depth(name: str) -> int:
    """The depth in a net's name."""
    return int("".join(c for c in name if c.isdigit()))


def run(ctx: Context, models: list[str]) -> dict:
    """Train (or reuse) every net with the same recipe; return their curves and claims."""
    runs = {name: run_result(ensure_run(ctx, ctx.config(name, name))) for name in models}
    return {"runs": runs, "claims": claims(runs)}


def claims(runs: dict) -> list[dict]:
    """The paper's Fig. 6 claims, judged on the nets that were run."""
    out = []
    plain = sorted((n for n in runs if n.startswith("plain")), key=depth)
    resnets = sorted((n for n in runs if n.startswith("resnet") and depth(n) <= 110), key=depth)
    # Fig. 6's plain nets end at 56 layers: a deeper one (plain-110, left out of the figure for
    # its error) is judged against the deepest of them, not in place of it.
    shown = [n for n in plain if depth(n) <= 56]
    if len(shown) >= 2:
        shallow, deep = runs[shown[0]], runs[shown[-1]]
        out.append(
            verdict(
                f"{shown[-1]} trains to a higher training error than {shown[0]} "
                "(the degradation problem)",
                deep["train_error"] > shallow["train_error"],
                _versus(deep, shallow, "train_error"),
            )
        )
    for name in [n for n in plain if depth(n) > 56] if shown else []:
        deeper, below = runs[name], runs[shown[-1]]
        out.append(
            verdict(
                f"{name} trains to a higher training error than {shown[-1]}",
                deeper["train_error"] > below["train_error"],
                _versus(deeper, below, "train_error"),
            )
        )
    if len(resnets) >= 2:
        shallow, deep = runs[resnets[0]], runs[resnets[-1]]
        out.append(
            verdict(
                f"{resnets[-1]} trains to a lower training error than {resnets[0]}",
                deep["train_error"] < shallow["train_error"],
                _versus(deep, shallow, "train_error"),
            )
        )
        if deep["test_error"] is not None and shallow["test_error"] is not None:
            out.append(
                verdict(
                    f"{resnets[-1]} reaches a lower {deep['eval_split']} error than {resnets[0]}",
                    deep["test_error"] < shallow["test_error"],
                    _versus(deep, shallow, "test_error"),
                )
            )
        else:
            out.append(
                not_judged(
                    f"{resnets[-1]} reaches a lower test error than {resnets[0]} (Fig. 6's "
                    "bold curves)",
                    no_held_out([deep, shallow]),
                )
            )
    for p in plain:
        twin = "resnet" + p[len("plain") :]
        if twin in runs:
            a, b = runs[twin], runs[p]
            out.append(
                verdict(
                    f"{twin} reaches a lower training error than its plain twin {p}",
                    a["train_error"] < b["train_error"],
                    _versus(a, b, "train_error"),
                )
            )
    if "resnet1202" in runs and "resnet110" in runs:
        big, small = runs["resnet1202"], runs["resnet110"]
        claim = "resnet1202 has a higher {} error than resnet110 (it overfits)"
        if big["test_error"] is None or small["test_error"] is None:
            out.append(not_judged(claim.format("test"), no_held_out([big, small])))
        else:
            out.append(
                verdict(
                    claim.format(big["eval_split"]),
                    big["test_error"] > small["test_error"],
                    _versus(big, small, "test_error"),
                )
            )
    return out


def _versus(a: dict, b: dict, key: str) -> str:
    """Two runs' errors side by side, with a note where they differ by less than chance."""
    x, y = a[key], b[key]
    return f"{x:.2f}% vs {y:.2f}%{within_chance(a, b, key)}"
