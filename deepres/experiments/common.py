"""What every experiment shares: budgets, training or reusing its runs, and run results."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from deepres.checkpoint import CHECKPOINT, CONFIG, read_config
from deepres.data import open_dataset
from deepres.data.readers import NAMED_DATA, absolute_data, locate_data
from deepres.models import count_params, create_model
from deepres.paper import CIFAR10_CLASSES, TABLE6_ITERS
from deepres.recipes import default_recipe, get_recipe
from deepres.report import curve, final_training, final_window, moves, read_metrics
from deepres.train import SUMMARY, TrainConfig, hold_run, load_config, train


@dataclass(frozen=True)
class Budget:
    """How long each net of an experiment trains, and the batch it trains with."""

    name: str
    iters: int
    batch_size: int | None = None
    log_every: int = 50
    evals: int = 40
    checkpoint_every: int = 200


BUDGETS = {
    # Seconds on tiny data: for tests and a first look.
    "smoke": Budget("smoke", iters=4, batch_size=16, log_every=2, evals=2, checkpoint_every=1),
    # Fits this project's 2-core CPU: the four-net degradation run within about 90 minutes.
    "short": Budget("short", iters=2000, evals=20),
    # The paper's schedule: 64k iterations of batch 128 (Sec. 4.2): hours per net on a CPU,
    # so a checkpoint every few minutes (100 iterations of ResNet-110 on one CPU thread: ~6).
    "full": Budget("full", iters=64_000, checkpoint_every=100),
}


@dataclass
class Context:
    """One `deepres reproduce` invocation: where the runs go and how they are trained."""

    data: str
    budget: Budget
    runs_dir: Path
    val_split: int
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    # torch.compile each run's training step: how it trains, not what (a resume may differ).
    compile: bool = False
    # On one GPU, each step replayed as a CUDA graph (train's default); likewise how, not what.
    cuda_graph: bool = True

    def config(self, name: str, model: str, **options) -> TrainConfig:
        """The TrainConfig of one run of this experiment."""
        return TrainConfig(
            model=model,
            data=self.data,
            out=str(self.runs_dir / name),
            iters=self.budget.iters,
            batch_size=self.budget.batch_size,
            val_split=self.val_split,
            seed=self.seed,
            log_every=self.budget.log_every,
            eval_every=max(1, self.budget.iters // self.budget.evals),
            checkpoint_every=self.budget.checkpoint_every,
            device=self.device,
            compile=self.compile,
            cuda_graph=self.cuda_graph,
            **options,
        )


# Where a run lives and how it is run, logged and saved, not what it learns: a run that
# differs from the one asked for in these alone is that run.
_HOW_NOT_WHAT = {
    "out",
    "device",
    "compile",
    "cuda_graph",
    "channels_last",
    "checkpoint_every",
    "log_every",
    "eval_every",
}


def same_run(saved: TrainConfig, config: TrainConfig) -> bool:
    """Whether a saved run is the run config asks for (precision auto accepts what it became).

    The data is same_data's question: the same images may lie under another path.
    """
    ignored = _HOW_NOT_WHAT | {"data"} | ({"precision"} if config.precision == "auto" else set())
    a, b = asdict(saved), asdict(config)
    return all(a[k] == b[k] for k in a if k not in ignored)


def same_data(run: Path, data: str) -> bool:
    """Whether a saved run trained on data: the same images, wherever either copy lies.

    Told by the fingerprint of the decoded images where the run recorded one, or where its data
    is still found to take one; a run that streamed photos, by the data's absolute path.
    """
    saved = read_config(run)
    given, image_size = saved["config"]["data"], saved["config"]["image_size"]
    recorded_path = saved.get("data_path") or absolute_data(given)
    if saved.get("augment") is not None:
        return recorded_path == absolute_data(data)  # too many photos to decode for a fingerprint
    theirs = saved.get("data_sha256")
    if theirs is None:
        if recorded_path == absolute_data(data):
            return True
        where = locate_data(given, recorded_path)
        if where not in NAMED_DATA and not Path(where).exists():
            raise ValueError(
                f"{run}: trained on {given}, which is not here to compare with {data} (the run"
                " recorded no fingerprint of its images); remove it or choose another --runs"
            )
        theirs = open_dataset(where, "train", image_size=image_size).fingerprint()
    return theirs == open_dataset(data, "train", image_size=image_size).fingerprint()


class Stopped(KeyboardInterrupt):
    """A run was stopped (SIGINT/SIGTERM) and checkpointed: the experiment stops with it."""


def ensure_run(ctx: Context, config: TrainConfig) -> Path:
    """Train a run, resume it if it was stopped, or reuse it if it is finished."""
    run = Path(config.out)
    if (run / CONFIG).exists():
        saved = load_config(run)
        if not same_run(saved, config):
            raise ValueError(
                f"{run}: holds a run with other settings; remove it or choose another --runs"
            )
        if not same_data(run, config.data):
            raise ValueError(
                f"{run}: holds a run trained on other data ({saved.data}); remove it or choose"
                " another --runs"
            )
        if (run / SUMMARY).exists():
            return run
        if not (run / CHECKPOINT).exists():
            # Killed before its first checkpoint (SIGKILL, a machine lost): nothing to resume,
            # so it starts again, unless another process is training it now (RunInUse).
            with hold_run(run):
                shutil.rmtree(run)
            return ensure_run(ctx, config)
        # How it runs is today's, not what it started with: where it saves, whether it compiles
        # or replays CUDA graphs, the device, and the data's path (the same images, checked).
        today = {k: getattr(config, k) for k in ("checkpoint_every", "compile", "cuda_graph")}
        summary = train(
            replace(saved, data=config.data, device=config.device, **today),
            resume=True,
            progress=ctx.progress,
        )
    else:
        summary = train(config, progress=ctx.progress)
    if not summary["finished"]:
        # Not on to the next net, nor a report of unfinished runs: the signal was for all of it.
        raise Stopped(f"{run}: stopped at iteration {summary['iteration']}; run again to resume")
    return run


def run_result(run: Path) -> dict:
    """Final errors, params and curves of a finished run, in %."""
    saved = read_config(run)
    metrics = read_metrics(run)
    split = saved.get("eval_split")
    evaluated = [m for m in metrics if f"{split}_error" in m]
    model = create_model(saved["model"], **saved["model_options"])
    train_error, train_loss = final_training(metrics)
    return {
        "run": str(run),
        "model": saved["model"],
        "train_error": train_error,
        "train_loss": train_loss,
        # How many augmented images that training error is over (its sampling noise needs it).
        "train_images": sum(m["images"] for m in final_window(metrics)),
        "test_error": evaluated[-1][f"{split}_error"] if evaluated else None,
        "eval_split": split,
        # How many images the held-out error is over (runs from before config.json said so:
        # their --val-split, where that is the split).
        "eval_images": saved.get("eval_images")
        or (saved["config"].get("val_split") if split == "val" else None),
        "precision": _precision(saved, metrics),
        "iters": metrics[-1]["iteration"],
        "params": count_params(model),
        "seconds": metrics[-1]["seconds"],
        "git_commit": saved.get("git_commit"),
        "git_dirty": saved.get("git_dirty"),
        "device": saved.get("device"),
        "torch": saved.get("torch"),
        "moved": moves(saved),
        "paper_protocol": paper_protocol(saved),
        "curve": curve(metrics, split),
    }


def _precision(saved: dict, metrics: list[dict]) -> str:
    # The precision it trained in; a run resumed with another --precision says from when.
    changes = saved.get("precision_changes", [])
    if not changes:
        return saved["config"].get("precision", "fp32")
    first = metrics[0].get("precision", "fp32")
    return "; ".join([first, *(f"{c['precision']} from {c['iteration']:,}" for c in changes)])


def paper_protocol(saved: dict) -> bool:
    """Whether a run's config.json is Table 6's: CIFAR-10, the paper's net and recipe, 64k."""
    # Only such runs' errors can be set against the paper's: another --lr, batch, shortcut,
    # width, normalisation or a start from other weights is another experiment, and so is
    # other data with CIFAR-10's classes (the JPEG copy costs about 3 points: paper.py).
    recipe = saved["recipe"]
    options = {
        k: v for k, v in saved["model_options"].items() if k not in ("num_classes", "in_channels")
    }
    paper = get_recipe(default_recipe(saved["model"])).to_dict()
    same_recipe = all(
        recipe.get(key) == paper[key]
        for key in ("lr", "momentum", "weight_decay", "batch_size", "gamma", "augment")
    )
    source = saved.get("data_source") or ""
    return (
        ("(CIFAR-10 python, " in source or "(CIFAR-10 binary, " in source)
        and saved["classes"] == CIFAR10_CLASSES
        and saved["input_size"] == [3, 32, 32]
        and recipe["iters"] == TABLE6_ITERS
        and list(recipe["milestones"]) == list(paper["milestones"])
        and same_recipe
        and recipe.get("warmup_lr") == paper["warmup_lr"]
        and saved.get("normalize", "pixel") == "pixel"
        and options in ({}, {"shortcut": "A"})
        and not saved["config"].get("init")
    )


def within_chance(a: dict, b: dict, key: str) -> str:
    """A note where two runs' errors under key (train_error, test_error) differ by less than
    chance would, over the images each is over; "" where they do not, or the count is unknown."""
    count = "train_images" if key == "train_error" else "eval_images"
    n = min(a.get(count) or 0, b.get(count) or 0)
    x, y = a[key], b[key]
    if not n:
        return ""
    # Two standard errors of the difference of two error rates near their mean, each over n:
    # the sampling noise of the images counted, not the spread between runs of other seeds.
    p = (x + y) / 200
    two_se = 200 * math.sqrt(2 * p * (1 - p) / n)
    if abs(x - y) >= two_se:
        return ""
    return (
        f"; {CHANCE}: {abs(x - y):.2f} points apart, where two standard errors of a "
        f"difference over {n:,} images are {two_se:.2f}"
    )


# within_chance's mark in the evidence, which verdict carries into the verdict itself.
CHANCE = "within chance"


def verdict(claim: str, holds: bool, evidence: str, chance: bool | None = None) -> dict:
    """One of the paper's claims with what our numbers say of it: yes or no, within chance
    where a difference it rests on is smaller than sampling noise (chance; by default, where
    the evidence of a single comparison says so)."""
    chance = CHANCE in evidence if chance is None else chance
    said = ("yes" if holds else "no") + (f", {CHANCE}" if chance else "")
    return {"claim": claim, "verdict": said, "evidence": evidence}


def not_judged(claim: str, why: str) -> dict:
    """One of the paper's claims these runs cannot judge, and why."""
    return {"claim": claim, "verdict": "not judged", "evidence": why}


def no_held_out(runs: list[dict]) -> str:
    """Why a claim on held-out error is not judged on these runs."""
    if all(r["test_error"] is None for r in runs):
        return "no held-out images: every training image was trained on"
    return "not every run has a held-out error"
