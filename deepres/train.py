"""The training loop: one paper recipe, one net, one data set, read top to bottom.

A run directory holds config.json (everything needed to rebuild the net and its input),
preprocess.safetensors (the mean image), model.safetensors (weights), checkpoint.safetensors
(what a resume needs), metrics.jsonl, curves.png and, at the end, summary.json. Under
torchrun (see deepres.distributed) rank 0 alone writes them.
"""

from __future__ import annotations

import json
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from deepres import distributed
from deepres.checkpoint import (
    CHECKPOINT,
    CONFIG,
    PREPROCESS,
    WEIGHTS,
    load_checkpoint,
    load_preprocess,
    load_tensors,
    read_json,
    save_checkpoint,
    save_tensors,
    write_json,
)
from deepres.data import available_splits, open_dataset
from deepres.data.augment import Augment
from deepres.data.loader import BatchStream, Preprocess, split_train_val
from deepres.data.stream import (
    PhotoStream,
    default_workers,
    fit_statistics,
    open_photos,
    statistics_from,
    statistics_tensors,
    stream_kind,
)
from deepres.evaluate import error_rates, predict_logits
from deepres.models import create_model, model_family
from deepres.provenance import git_commit
from deepres.recipes import default_recipe, get_recipe
from deepres.report import METRICS, plot_run, read_metrics

SUMMARY = "summary.json"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as config.json and reused by --resume."""

    model: str
    data: str
    out: str
    recipe: str | None = None
    iters: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    val_split: int = 0
    seed: int = 0
    checkpoint_every: int = 1000
    eval_every: int | None = None
    log_every: int = 50
    deterministic: bool = False
    device: str = "auto"
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    shortcut: str | None = None
    width: int | None = None
    normalize: str | None = None
    image_size: int | None = None
    # The streaming path for photos (Sec. 3.4): views, lighting noise, DataLoader workers.
    augment: str = "scale"
    crop_size: int = 224
    scale: list[int] | None = None
    lighting: float = 0.1
    workers: int | None = None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    return torch.device(name)


def _model_options(config: TrainConfig, num_classes: int, in_channels: int) -> dict:
    options = {"num_classes": num_classes, "in_channels": in_channels}
    if config.shortcut:
        options["shortcut"] = config.shortcut
    if config.width:
        options["width"] = config.width
    return options


def build_model(saved: dict) -> torch.nn.Module:
    """The net described by a run's config.json (weights not loaded)."""
    return create_model(saved["model"], **saved["model_options"])


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop can stop between steps and checkpoint first."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum, frame) -> None:
        self.raised = True


def train(
    config: TrainConfig, resume: bool = False, stop_at: int | None = None, progress: bool = True
) -> dict:
    """Train (or resume) a run; stop_at ends the session early at that iteration, resumably.

    Launched by `torchrun --nproc_per_node N -m deepres.cli train ...`, N processes train the
    run together with DDP: the recipe's batch size stays the global batch, split evenly.
    """
    device = distributed.setup(_device(config.device))
    try:
        return _train(config, resume, stop_at, progress, device)
    finally:
        distributed.teardown()


def _train(
    config: TrainConfig, resume: bool, stop_at: int | None, progress: bool, device: torch.device
) -> dict:
    rank, world_size = distributed.world()
    main = rank == 0
    run = Path(config.out)
    if resume and not (run / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run / CHECKPOINT}: no checkpoint to resume from; start again")
    if not resume and (run / CONFIG).exists():
        raise FileExistsError(f"{run}: already holds a run; --resume {run} or choose another --out")
    # Every rank has looked before rank 0 writes config.json.
    distributed.barrier()
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = not config.deterministic
    if config.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be fp32 or bf16, got {config.precision!r}")

    # Data, by one of two paths chosen here: an ImageNet net on photos (an image folder or tar
    # shards, no --image-size) streams them through DataLoader workers; anything else is
    # decoded once, held out with a fixed seed, then moved whole to the device.
    streaming = (
        config.image_size is None
        and model_family(config.model) == "imagenet"
        and stream_kind(config.data) is not None
    )
    if streaming:
        sizes = {"sizes": tuple(config.scale)} if config.scale else {}
        augment = Augment.scaled(config.augment, config.crop_size, **sizes)
        workers = default_workers() if config.workers is None else config.workers
        photos = open_photos(config.data, config.val_split, augment, workers, decode_eval=main)
        eval_split, eval_images, eval_labels = (
            photos.eval_split,
            photos.eval_images,
            photos.eval_labels,
        )
        classes, n_train, source = photos.train.classes, len(photos.train), photos.train.source
        input_size = [3, augment.crop, augment.crop]
    else:
        dataset = open_dataset(config.data, "train", image_size=config.image_size)
        train_idx, val_idx = split_train_val(len(dataset.labels), config.val_split)
        train_images = dataset.images[train_idx]
        if config.val_split:
            eval_split, eval_images, eval_labels = (
                "val",
                dataset.images[val_idx],
                dataset.labels[val_idx],
            )
        elif "test" in available_splits(config.data):
            test = open_dataset(config.data, "test", image_size=config.image_size)
            eval_split, eval_images, eval_labels = "test", test.images, test.labels
        else:
            eval_split, eval_images, eval_labels = None, None, None
        classes, n_train, source = dataset.classes, len(train_idx), dataset.source
        input_size = list(dataset.images.shape[1:])

    # Recipe: the paper's, scaled to the budget asked for.
    recipe = get_recipe(config.recipe or default_recipe(config.model, photos=streaming))
    if config.batch_size:
        recipe = replace(recipe, batch_size=config.batch_size)
    if config.lr:
        recipe = replace(recipe, lr=config.lr)
    steps_per_epoch = n_train // recipe.batch_size
    if config.epochs is not None:
        recipe = recipe.scaled(max(1, round(config.epochs * steps_per_epoch)))
    elif config.iters is not None:
        recipe = recipe.scaled(config.iters)
    normalize = config.normalize or recipe.normalize
    if streaming and normalize != "channel":
        raise ValueError(
            f"--normalize {normalize}: photos of many sizes have no mean image; use channel"
        )
    log_every = max(1, min(config.log_every, recipe.iters))
    # Evaluation happens at log records: about 40 points per curve unless asked otherwise.
    eval_every = config.eval_every or recipe.iters // 40
    eval_every = max(1, -(-eval_every // log_every)) * log_every

    torch.manual_seed(config.seed)
    model_options = _model_options(config, len(classes), input_size[0])
    model = create_model(config.model, **model_options).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )

    # Built before anything is written: a batch that cannot be drawn leaves no half-made run.
    if streaming:
        preprocess, lighting = (
            statistics_from(load_tensors(run / PREPROCESS)[0], config.lighting, run / PREPROCESS)
            if resume
            else fit_statistics(photos.train, augment, config.lighting, workers=workers)
        )
        saved_statistics = statistics_tensors(preprocess, lighting)
        stream = PhotoStream(
            photos.train,
            preprocess,
            recipe.batch_size,
            config.seed,
            augment,
            lighting if config.lighting else None,
            device,
            workers,
            config.channels_last,
            shard=(rank, world_size),
        )
    else:
        preprocess = (
            Preprocess(*load_preprocess(run)) if resume else Preprocess.fit(train_images, normalize)
        ).to(device)
        saved_statistics = {"mean": preprocess.mean, "std": preprocess.std}
        stream = BatchStream(
            train_images.to(device),
            dataset.labels[train_idx].to(device),
            preprocess,
            recipe.batch_size,
            config.seed,
            recipe.augment,
            config.channels_last,
            shard=(rank, world_size),
        )

    run.mkdir(parents=True, exist_ok=True)
    state = {
        "iteration": 0,
        "warming_up": recipe.warmup_lr is not None,
        "seconds": 0.0,
        "window": [0.0, 0.0, 0],
    }
    if resume:
        state = load_checkpoint(run, model, optimizer)
        if main:
            _truncate_metrics(run / METRICS, state["iteration"])
    elif main:
        saved = {
            "config": asdict(config),
            "model": config.model,
            "model_options": model_options,
            "family": model_family(config.model),
            "classes": classes,
            "input_size": input_size,
            "normalize": normalize,
            "recipe": recipe.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "n_train": n_train,
            "eval_split": eval_split,
            "data_source": source,
            "augment": asdict(augment) if streaming else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_commit": git_commit(),
        }
        write_json(run / CONFIG, saved)
        save_tensors(run / PREPROCESS, saved_statistics)
        (run / METRICS).write_text("")
    # DDP averages the gradients over the ranks (the paper's CIFAR batch of 128 was split over
    # two GPUs, Sec. 4.2); BN statistics stay per rank, with no SyncBN.
    replica = distributed.wrap(model, device)
    if config.compile:
        # Fuses BN, ReLU and the additions around the convolutions: 12% more images/s on
        # this project's 2-core CPU (measured; benchmarks/results), after ~30 s of compiling.
        replica = torch.compile(replica)
    # Rank 0 alone evaluates, on the unwrapped net: no collective waits on the others.
    if not main:
        eval_images = None
    if eval_images is not None:
        eval_images = eval_images.to(device)

    stop = _StopFlag()
    previous = (
        {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    # A saved window holds the sums over all ranks: rank 0 carries them on.
    window_loss, window_err, window_n = state["window"] if main else [0.0, 0.0, 0]
    window_loss = torch.tensor(window_loss, device=device)
    window_err = torch.tensor(window_err, device=device)
    start_iter = state["iteration"]
    bar = tqdm(
        total=recipe.iters,
        initial=start_iter,
        disable=not (progress and main),
        unit="it",
        dynamic_ncols=True,
        desc=config.model,
    )
    t_window = time.perf_counter()
    t_session = t_window
    seconds_before = state["seconds"]
    iteration = start_iter
    agreed_stop = False
    try:
        while iteration < recipe.iters:
            lr = recipe.lr_at(iteration, state["warming_up"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = stream.batch(iteration)
            with amp:
                logits = replica(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: no host sync inside a step.
            window_loss += loss.detach().float() * len(y)
            window_err += (logits.detach().argmax(1) != y).sum()
            window_n += len(y)
            iteration += 1
            bar.update(1)

            if iteration % log_every == 0 or iteration == recipe.iters:
                # Sums over the ranks: the record covers the global batch, and a signal that
                # any rank caught stops them all at this same step.
                loss_sum, err_sum, images, stops = distributed.sum_over_ranks(
                    [window_loss, window_err, window_n, stop.raised], device
                )
                agreed_stop = stops > 0
                now = time.perf_counter()
                record = {
                    "iteration": iteration,
                    "epoch": round(iteration / steps_per_epoch, 3),
                    "train_loss": loss_sum / images,
                    "train_error": 100.0 * err_sum / images,
                    "images": int(images),
                    "lr": lr,
                    "images_per_sec": images / max(now - t_window, 1e-9),
                }
                if state["warming_up"] and record["train_error"] < 100 * recipe.warmup_until_error:
                    state["warming_up"] = False
                if eval_images is not None and (
                    iteration % eval_every == 0 or iteration == recipe.iters
                ):
                    logits_eval = predict_logits(
                        model, eval_images, preprocess, channels_last=config.channels_last
                    )
                    record[f"{eval_split}_error"] = error_rates(logits_eval, eval_labels)[
                        "top1_error"
                    ]
                state["seconds"] = seconds_before + time.perf_counter() - t_session
                record["seconds"] = round(state["seconds"], 3)
                if main:
                    with open(run / METRICS, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(
                    loss=f"{record['train_loss']:.3f}",
                    err=f"{record['train_error']:.1f}%",
                    lr=f"{lr:g}",
                    ips=f"{record['images_per_sec']:.0f}",
                )
                window_loss.zero_()
                window_err.zero_()
                window_n = 0
                t_window = time.perf_counter()

            due = iteration % config.checkpoint_every == 0 or iteration == recipe.iters
            # Under torchrun the ranks must stop at the same step: a signal counts once agreed.
            signalled = agreed_stop if world_size > 1 else stop.raised
            halt = signalled or (stop_at is not None and iteration >= stop_at)
            if due or halt:
                state["iteration"] = iteration
                state["seconds"] = seconds_before + time.perf_counter() - t_session
                loss_sum, err_sum, images = distributed.sum_over_ranks(
                    [window_loss, window_err, window_n], device
                )
                state["window"] = [loss_sum, err_sum, int(images)]
                if main:
                    # The unwrapped net's names, so that runs resume with or without torchrun.
                    save_checkpoint(run, model, optimizer, state)
                    save_tensors(run / WEIGHTS, model.state_dict())
            if halt:
                break
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    # The others read the metrics.jsonl that rank 0 has just finished.
    distributed.barrier()
    finished = iteration >= recipe.iters
    summary = {
        "run": str(run),
        "model": config.model,
        "iteration": iteration,
        "iters": recipe.iters,
        "finished": finished,
        "seconds": state["seconds"],
    }
    metrics = read_metrics(run)
    if metrics:
        summary["train_error"] = metrics[-1]["train_error"]
        evaluated = [m for m in metrics if f"{eval_split}_error" in m]
        if evaluated:
            summary[f"{eval_split}_error"] = evaluated[-1][f"{eval_split}_error"]
            summary["eval_split"] = eval_split
        summary["images_per_sec"] = (
            (iteration - start_iter)
            * recipe.batch_size
            / max(state["seconds"] - seconds_before, 1e-9)
        )
    if main:
        plot_run(run)
        if finished:
            write_json(run / SUMMARY, summary)
    return summary


def _truncate_metrics(path: Path, iteration: int) -> None:
    # Records written after the checkpoint will be written again by the resumed run.
    if path.exists():
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["iteration"] <= iteration
        ]
        path.write_text("".join(line + "\n" for line in kept))


def load_config(run: Path) -> TrainConfig:
    """The TrainConfig a run was started with."""
    saved = read_json(Path(run) / CONFIG)
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved["config"].items() if k in known})
