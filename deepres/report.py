"""Plots and Markdown pages from runs: training curves in the style of Fig. 6."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from deepres.checkpoint import (
    CONFIG,
    SUMMARY,
    atomic_write,
    checkpoint_state,
    read_config,
    read_json,
    write_json,
    write_text,
)
from deepres.paper import JPEG_CIFAR10_ERROR, TABLE6_ERROR, TABLE6_MEAN, TABLE6_NOTE

METRICS = "metrics.jsonl"


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run) / METRICS
    if not path.exists():
        return []
    try:
        # A process killed mid-append can leave a last line without its newline: not a record.
        lines = path.read_text().split("\n")[:-1]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not text") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record["iteration"], int) and record["images"] > 0
            # What the reports and the final summary read from every record.
            ok = ok and all(
                isinstance(record[k], int | float) for k in ("train_error", "train_loss")
            )
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: line {number} is not a training record")
        records.append(record)
    return records


def final_training(metrics: list[dict]) -> tuple[float, float]:
    """Training error (%) and loss at the end of a run: the mean over its last 1/128.

    A log record covers 50 augmented batches; at the full budget the last 1/128 is 500
    iterations (64,000 images), which steadies the number without reaching back past the
    last learning-rate step. At shorter budgets it is the last record alone.
    """
    tail = final_window(metrics)
    images = sum(m["images"] for m in tail)
    error = sum(m["train_error"] * m["images"] for m in tail) / images
    loss = sum(m["train_loss"] * m["images"] for m in tail) / images
    return error, loss


def final_window(metrics: list[dict]) -> list[dict]:
    """The log records of a run's last 1/128 of iterations (its last record at least)."""
    last = metrics[-1]["iteration"]
    return [m for m in metrics if m["iteration"] > last - max(1, last // 128)] or metrics[-1:]


def block_errors(metrics: list[dict], block: int) -> list[dict]:
    """Training error (%) over each whole block of `block` iterations a run has passed.

    Runs at different stages compare at the same iterations this way: ResNet-56 against
    ResNet-20 over iterations 6,001-7,000, say, rather than each at the end of its log.
    """
    out = []
    # Only whole blocks that hold records: a damaged iteration of 10**12 is one block, not 10**9.
    last = metrics[-1]["iteration"] if metrics else 0
    ends = {-(-m["iteration"] // block) * block for m in metrics}
    for end in sorted(e for e in ends if e <= last):
        window = [m for m in metrics if end - block < m["iteration"] <= end]
        images = sum(m["images"] for m in window)
        if images:
            error = sum(m["train_error"] * m["images"] for m in window) / images
            out.append({"iterations": [end - block + 1, end], "train_error": round(error, 2)})
    return out


def block_table(rows: list[dict]) -> tuple[list[str], list[tuple[tuple[int, int], list]]]:
    """The runs' names and, block by block, each run's training error there (None: not yet)."""
    names = [Path(r["run"]).name for r in rows]
    if len(set(names)) < len(names):  # runs of one name in different folders
        names = [r["run"] for r in rows]
    errors: dict[tuple[int, int], dict[str, float]] = {}
    for name, row in zip(names, rows, strict=True):
        for block in row["train_error_by_block"]:
            errors.setdefault(tuple(block["iterations"]), {})[name] = block["train_error"]
    return names, [(span, [e.get(n) for n in names]) for span, e in sorted(errors.items())]


def trained_on(saved: dict) -> list[dict]:
    """Each device a run (its config.json) trained on, from the iteration it began there."""
    segments = [{"from_iteration": 0, "device": saved.get("device"), "torch": saved.get("torch")}]
    for resume in saved.get("resumed", []):
        if resume["device"] != segments[-1]["device"]:
            segments.append(
                {
                    "from_iteration": resume["iteration"],
                    "device": resume["device"],
                    "torch": resume.get("torch"),
                }
            )
    return segments


def moves(saved: dict) -> list[dict]:
    """The resumes of a run (its config.json) that went on on another device than before."""
    return [
        {"iteration": s["from_iteration"], "device": s["device"]} for s in trained_on(saved)[1:]
    ]


def _number(value: object, run: Path) -> float | None:
    """A number of a run's metrics record, or None; anything else is a damaged file."""
    if value is not None and not isinstance(value, int | float):
        raise ValueError(f"{run / METRICS}: {value!r} where a number belongs")
    return value


def run_status(run: Path) -> dict:
    """Where a run stands: the iteration it would resume from, its training error (as the
    reports take it) and learning rate, its hours so far and, at its recent speed, the hours
    it has left."""
    run = Path(run)
    saved = read_config(run)
    try:
        model, recipe = saved["model"], saved["recipe"]
        iters, batch = recipe["iters"], recipe["batch_size"]
    except (KeyError, TypeError):
        raise ValueError(f"{run / CONFIG}: not the config of a deepres run") from None
    finished = (run / SUMMARY).is_file()
    state = read_json(run / SUMMARY) if finished else checkpoint_state(run) or {}
    if not isinstance(state, dict):
        raise ValueError(f"{run / SUMMARY}: not a run summary")
    metrics = read_metrics(run)
    last = metrics[-1] if metrics else {}
    iteration = state.get("iteration", 0)
    if finished:
        speed, left = state.get("images_per_sec"), None
    else:
        # Over the last 10 log windows, time-weighted: one window slowed by a test run beside
        # it does not swing the estimate of a run with many hours left.
        recent = [m["images_per_sec"] for m in metrics[-10:] if m.get("images_per_sec")]
        speed = len(recent) / sum(1 / s for s in recent) if recent else None
        left = (iters - iteration) * batch / speed / 3600 if speed else None
    return {
        "run": str(run),
        "model": model,
        "iteration": iteration,
        "iters": iters,
        "finished": finished,
        "train_error": final_training(metrics)[0] if metrics else None,
        "train_loss": final_training(metrics)[1] if metrics else None,
        "lr": _number(last.get("lr"), run),
        # Saved resolved ("auto" became fp32 or bf16 when the run started).
        "precision": saved["config"].get("precision"),
        # Where it started (runs from before config.json named it: None), and where it went on.
        "device": saved.get("device"),
        "moved": moves(saved),
        "hours": state.get("seconds", 0.0) / 3600,
        "images_per_sec": speed,
        "hours_left": left,
        "train_error_by_block": block_errors(metrics, _block(iters, saved)),
    }


def _block(iters: int, saved: dict) -> int:
    # 1/64 of the budget (1,000 iterations at the full 64k), in whole log windows; a run
    # shorter than its log_every logs at its end (train.py).
    every = min(saved.get("config", {}).get("log_every") or 1, iters)
    return max(1, math.ceil(iters / 64 / every)) * every


def find_runs(paths: list[Path]) -> list[Path]:
    """The run directories (config.json beside metrics.jsonl) at or below the paths, sorted."""
    found = [metrics for path in map(Path, paths) for metrics in path.rglob(METRICS)]
    return sorted({m.parent for m in found if (m.parent / CONFIG).is_file()})


def curve(metrics: list[dict], split: str | None) -> dict:
    """A run's training error and its evaluation error (test or val) against iterations."""
    evaluated = [m for m in metrics if f"{split}_error" in m]
    return {
        "iteration": [m["iteration"] for m in metrics],
        "train_error": [m["train_error"] for m in metrics],
        "eval_iteration": [m["iteration"] for m in evaluated],
        "eval_error": [m[f"{split}_error"] for m in evaluated],
    }


def plot_curves(ax: Axes, curve: dict, label: str) -> None:
    """Training error dashed, evaluation error solid, error % against iterations (Fig. 6)."""
    (line,) = ax.plot(curve["iteration"], curve["train_error"], "--", lw=1)
    if curve["eval_iteration"]:
        ax.plot(
            curve["eval_iteration"],
            curve["eval_error"],
            "-",
            lw=2,
            color=line.get_color(),
            label=label,
        )
    else:
        line.set_label(label)


def style_axes(ax: Axes, title: str = "") -> None:
    """The paper's axes: iterations on x, error % on y."""
    ax.set_xlabel("iter.")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # a run stopped before its first log has no curve
        ax.legend(fontsize=8)


def plot_run(run: Path) -> Path:
    """Write RUN/curves.png: one run's training (dashed) and evaluation (solid) error."""
    run = Path(run)
    # Figure, not pyplot: no backend is chosen, so a user's own (a notebook's) stays as it was.
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    metrics = read_metrics(run)
    saved = json.loads((run / "config.json").read_text())
    name = saved["model"]
    if metrics:
        plot_curves(ax, curve(metrics, saved.get("eval_split")), name)
    style_axes(ax, f"{name}: training (dashed) and evaluation (solid) error")
    path = run / "curves.png"
    fig.tight_layout()
    # Atomic, like every run file: a full disk leaves the old plot, not half a new one.
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return path


def plot_status(rows: list[dict], path: Path) -> Path:
    """Write one figure of the runs `deepres status` lists, finished or not, as in Fig. 6."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for row in rows:
        run = Path(row["run"])
        metrics = read_metrics(run)
        if not metrics:
            continue
        saved = read_json(run / CONFIG)
        where = "done" if row["finished"] else f"at {row['iteration']:,} of {row['iters']:,}"
        plot_curves(ax, curve(metrics, saved.get("eval_split")), f"{run.name} ({where})")
    style_axes(ax, "training error (dashed), held-out error (solid)")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


PAPER_SAYS = {
    "degradation": "Fig. 6: the deeper plain net has the higher training error; the deeper "
    "ResNet the lower.",
    "responses": "Fig. 7: ResNets respond more weakly than their plain twins, and deeper "
    "ResNets more weakly still.",
    "table6": "Table 6: CIFAR-10 test error of the option-A ResNets.",
    "shortcuts": "Table 3 (ImageNet, ResNet-34): A 25.03, B 24.52, C 24.19 top-1 error (%): "
    "B slightly better than A, C marginally better than B.",
}


# Fig. 6 draws its errors from 0 to 20%. Where every curve of ours ends well inside that range,
# our figure does too: the ends the claims compare are told apart, and the first thousands of
# iterations run off the top as in the paper.
PAPER_ERROR_TOP = 20.0


def paper_ylim(curves: list[dict]) -> tuple[float, float] | None:
    """Fig. 6's error axis (0-20%) where every curve ends below 2/3 of it, else None (auto)."""
    ends = [c[k][-1] for c in curves for k in ("train_error", "eval_error") if c.get(k)]
    return (0.0, PAPER_ERROR_TOP) if ends and max(ends) < PAPER_ERROR_TOP * 2 / 3 else None


def _depth(name: str) -> int:
    found = re.search(r"\d+", name)
    return int(found.group()) if found else 0


def _curve_panel(ax, result: dict, names: list[str], title: str, ylim: tuple | None) -> None:
    # By depth, as the paper's legends run: 20, 32, 44, 56, 110.
    for name in sorted(names, key=_depth):
        plot_curves(ax, result["runs"][name]["curve"], name)
    style_axes(ax, title)
    if ylim:
        ax.set_ylim(*ylim)


def _figures(result: dict, out: Path) -> list[str]:
    names = list(result["runs"])
    experiment = result["experiment"]
    files = []
    if experiment in ("degradation", "table6", "shortcuts"):
        groups = [
            ("plain nets", [n for n in names if n.startswith("plain") and _depth(n) <= 56]),
            # Fig. 6 leaves plain-110 out, its error being above 60%: a panel of its own here.
            (
                "deeper plain nets (not in Fig. 6)",
                [n for n in names if n.startswith("plain") and _depth(n) > 56],
            ),
            (
                "ResNets",
                [n for n in names if n.startswith("resnet") and "-" not in n and n != "resnet1202"],
            ),
            # Fig. 6's right panel compares the two: with one of them, it would repeat a curve.
            (
                "ResNet-110 vs ResNet-1202",
                ["resnet110", "resnet1202"] if {"resnet110", "resnet1202"} <= set(names) else [],
            ),
            (
                "shortcut options",
                [n for n in names if n.startswith("resnet") and experiment == "shortcuts"],
            ),
        ]
        groups = [g for g in groups if g[1]]
        if experiment == "shortcuts":
            groups = groups[-1:]
        # At least 7 inches: one panel alone must still hold the figure's title.
        width = max(7, 5 * len(groups))
        fig = Figure(figsize=(width, 4))
        axes = fig.subplots(1, len(groups), squeeze=False)
        for ax, (title, group) in zip(axes[0], groups, strict=True):
            # Each panel's own: a panel whose curves end far above Fig. 6's axis must not
            # squash the others'.
            ylim = paper_ylim([result["runs"][n]["curve"] for n in group])
            _curve_panel(ax, result, group, title, ylim)
        held_out = f", {_split(result)} error (solid)" if _split(result) else ""
        fig.suptitle(f"{experiment}: training error (dashed){held_out}, {result['budget']} budget")
        files.append(_save(fig, out / f"{experiment}.png"))
    if experiment == "responses":
        fig = Figure(figsize=(7, 7))
        top, bottom = fig.subplots(2, 1)
        # Plain nets dashed, ResNets solid, each family by depth.
        order = sorted(result["responses"], key=lambda n: (not n.startswith("plain"), _depth(n)))
        for name in order:
            stds, style = result["responses"][name], "--" if name.startswith("plain") else "-"
            layers = range(1, len(stds) + 1)
            top.plot(layers, stds, style, marker=".", label=name)
            bottom.plot(layers, sorted(stds, reverse=True), style, marker=".", label=name)
        top.set_xlabel("layer index (original)")
        bottom.set_xlabel("layer index (sorted by magnitude)")
        scale = response_scale(result["responses"])
        for ax in (top, bottom):
            ax.set_yscale(scale)
            ax.set_ylabel("std" if scale == "linear" else "std (log scale)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Responses of the 3x3 layers (after BN, before addition/ReLU)")
        files.append(_save(fig, out / "responses.png"))
    return files


def response_scale(responses: dict[str, list[float]]) -> str:
    """The y scale of Fig. 7's panels: log where the responses span over 100x, linear else."""
    # Paper's Fig. 7 spans about 30x on a linear axis; a plain-110 whose first layers respond
    # a thousand times more flattens every other curve to zero there.
    stds = [s for layer_stds in responses.values() for s in layer_stds if s > 0]
    return "log" if stds and max(stds) > 100 * min(stds) else "linear"


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path.name


def _split(result: dict) -> str | None:
    if result["val_split"]:
        return "validation"
    return "test" if any(r["eval_split"] for r in result["runs"].values()) else None


def _commit(record: dict) -> str:
    """`abc123...`, marked where the code differed from that commit."""
    changed = " (with uncommitted changes)" if record.get("git_dirty") else ""
    return f"`{record.get('git_commit')}`{changed}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _by_precision(result: dict) -> dict[str, list[str]]:
    """The runs grouped by the precision they trained in."""
    groups: dict[str, list[str]] = {}
    for name, r in result["runs"].items():
        groups.setdefault(r.get("precision", "fp32"), []).append(name)
    return groups


def _by_device(result: dict) -> dict[str, list[str]]:
    """The runs grouped by where they started: the device their config.json names, and torch."""
    groups: dict[str, list[str]] = {}
    for name, r in result["runs"].items():
        # Runs from before config.json named the device say only their torch build.
        where = r.get("device") or "device not recorded"
        groups.setdefault(f"{where}, torch {r.get('torch') or '?'}", []).append(name)
    return groups


def _moved_line(result: dict) -> list[str]:
    """The report's line on runs resumed on another device, or none where no run was."""
    moved = [
        f"{name} on {m['device']} from iteration {m['iteration']:,}"
        for name, r in result["runs"].items()
        for m in r.get("moved", [])
    ]
    return ["- resumed on another device: " + "; ".join(moved)] if moved else []


def beside_table6(name: str, run: dict) -> tuple[float | None, float | None, str]:
    """The paper's Table 6 error of a net, our run's gap to it, and the paper's note on it."""
    paper = TABLE6_ERROR.get(name)
    # A gap only between test errors of CIFAR-10 nets trained the paper's 64k iterations: a
    # validation error, other data or a shorter budget is not the paper's kind of number.
    comparable = paper and run["eval_split"] == "test" and run.get("paper_protocol")
    gap = run["test_error"] - TABLE6_MEAN.get(name, paper) if comparable else None
    return paper, gap, TABLE6_NOTE.get(name, "") if paper else ""


def write_report(result: dict, out: Path) -> Path:
    """DIR/results.json, the figures and DIR/report.md of one experiment's result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(result, out)
    m = result["machine"]
    split = _split(result)
    lines = [
        f"# {result['experiment']}: {result['budget']} budget",
        "",
        PAPER_SAYS[result["experiment"]],
        "",
        "## What was run",
        "",
        f"- command: `{result['command']}`",
        f"- data: `{result['data']}`; "
        + {
            "validation": f"{result['val_split']} training images held out, errors are "
            "**validation** errors",
            "test": "errors on the data's test split",
            None: "every training image is trained on (the paper's final protocol) and no "
            "test split is at hand: **training** error and loss only",
        }[split],
        f"- budget: `{result['budget']}`, {result['iters']} iterations per net "
        f"(the paper: 64,000); the paper's recipe, milestones scaled in proportion",
        "- started on: "
        + "; ".join(f"{d} ({', '.join(names)})" for d, names in _by_device(result).items()),
        *_moved_line(result),
        f"- this report made on: {m['cpu']} ({m['cpu_count']} cores"
        + (f"; {', '.join(m['cpu_flags'])}" if m.get("cpu_flags") else "")
        + ")"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f", {m['platform']}",
        "- precision: "
        + "; ".join(f"{p} ({', '.join(names)})" for p, names in _by_precision(result).items())
        + " (`--precision auto`: bf16 autocast where the device computes bf16 natively, "
        "fp32 elsewhere)",
        f"- torch {m['torch']}; deepres commit {_commit(m)} for this report, "
        + ", ".join(sorted({_commit(r) for r in result["runs"].values()}))
        + " for the training runs",
        f"- training time of the runs: {result['training_seconds'] / 60:.1f} min; this "
        f"invocation: {result['wall_seconds'] / 60:.1f} min (finished runs are reused)",
        "",
    ]
    for name in figures:
        lines += [f"![{name}]({name})", ""]
    lines += [
        "## Numbers",
        "",
        f"| net | params | iterations | training hours | training error % | training loss | "
        f"{split or 'held-out'} error % | paper's test error % (Table 6"
        + ("; not comparable with a training error" if split is None else "")
        + ") | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        paper, gap, note = beside_table6(name, r)
        note = f" ({note})" if note else ""
        lines.append(
            f"| {name} | {r['params']:,} | {r['iters']} | {r['seconds'] / 3600:.2f} | "
            f"{_pct(r['train_error'])} | {r['train_loss']:.4f} | {_pct(r['test_error'])} | "
            f"{_pct(paper)}{note} | {_pct(gap)} |"
        )
    windows = sorted({r["train_images"] for r in result["runs"].values() if r.get("train_images")})
    lines += [
        "",
        "Training error and loss: the mean over each run's last 1/128 of iterations, or its "
        "last log record where that is longer"
        + (f" ({' or '.join(f'{n:,}' for n in windows)} images)" if windows else "")
        + ", on the augmented batches the loop trained on (the thin curves of Fig. 6).",
    ]
    if "responses" in result:
        lines += [
            "",
            f"Response std, mean over layers ({result['n_images']} "
            f"{result.get('response_images', split)} images):",
            "",
        ]
        lines += [
            f"- {n}: {sum(v) / len(v):.3f} over {len(v)} layers"
            for n, v in result["responses"].items()
        ]
    lines += ["", "## The paper's claims, judged by these numbers", ""]
    for c in result["claims"]:
        lines.append(f"- {c['claim']}: **{c['verdict']}**, {c['evidence']}")
    if not result["claims"]:
        lines.append("- (no claim can be judged with the nets that were run)")
    lines += [
        "",
        "The paper's numbers come from the full 64k-iteration schedule on the original "
        "CIFAR-10 test set; a shorter budget or other data gives higher errors, so compare "
        "the direction of each claim, not the size of the errors.",
        "",
    ]
    if split is None:
        lines += [
            "Our errors here are training errors, on the images the nets learned: far below "
            "any test error, the paper's included. Its column stands beside them for reference, "
            "not for comparison; no gap is taken.",
            "",
        ]
    if "jpeg" in Path(str(result["data"])).name.lower():
        on_jpeg = ", ".join(f"{n} {e}%" for n, e in JPEG_CIFAR10_ERROR.items())
        lines += [
            "On the JPEG copy of CIFAR-10 (quality 75) the paper reproduced is about "
            f"{on_jpeg} test error: Table 6 plus what the re-encoding costs, as "
            "`../shared/data/README.md` measured it.",
            "",
        ]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    # Last: results.json never describes a result whose report did not get written.
    write_json(out / "results.json", result)
    return path
