"""The training loop: one paper recipe, one net, one data set, read top to bottom.

A run directory holds config.json (everything needed to rebuild the net and its input),
preprocess.safetensors (the mean image), model.safetensors (weights), checkpoint.safetensors
(what a resume needs), metrics.jsonl, curves.png and, at the end, summary.json. Under
torchrun (see deepres.distributed) rank 0 alone writes them. The directory is the run:
config.json does not record where it lives, so a run copied or moved resumes where it is.
A run stops with one line when its loss or weights stop being finite, or when a file cannot be
written; what it had saved before stays as it was.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from deepres import distributed
from deepres.checkpoint import (
    CHECKPOINT,
    CONFIG,
    PREPROCESS,
    SUMMARY,
    WEIGHTS,
    append_text,
    load_checkpoint,
    load_preprocess,
    load_tensors,
    read_config,
    read_json,
    save_checkpoint,
    save_tensors,
    sync_file,
    write_json,
    write_text,
)
from deepres.data import DataError, ImageDataset, available_splits, open_dataset
from deepres.data.augment import Augment
from deepres.data.loader import BatchStream, Preprocess, split_train_val
from deepres.data.readers import NAMED_DATA, absolute_data, locate_data, match_channels
from deepres.data.stream import (
    PhotoStream,
    default_workers,
    fit_statistics,
    open_photos,
    statistics_from,
    statistics_tensors,
    streamable_splits,
)
from deepres.evaluate import MAX_SIDE, error_rates, predict_logits
from deepres.finetune import check_init, freeze_backbone, init_source, load_backbone, read_init
from deepres.inference import no_tf32, parse_device
from deepres.models import Bottleneck, create_model, model_family
from deepres.provenance import git_commit, git_dirty, machine
from deepres.recipes import Recipe, default_recipe, get_recipe
from deepres.report import METRICS, final_training, plot_run, read_metrics


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as config.json (less out) and reused by --resume.

    out is where a new run is written; a saved run is wherever its directory is.
    """

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
    # Iterations a log record sums over; also the window whose training error ends a warm-up
    # (below 80%): the paper's "about 400 iterations" were judged over 50 here.
    log_every: int = 50
    deterministic: bool = False
    device: str = "auto"
    # auto: bf16 autocast where the device computes bf16 natively, else fp32; resolved once,
    # when the run starts, and saved resolved.
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    # The whole step (forward, backward, SGD) replayed as one CUDA graph: on a single GPU
    # without --compile; how it runs, not what it learns.
    cuda_graph: bool = True
    shortcut: str | None = None
    # Bottleneck nets: "1x1" is the paper's v1 (the default), "3x3" is v1.5, torchvision's.
    stride_in: str | None = None
    width: int | None = None
    normalize: str | None = None
    image_size: int | None = None
    init: str | None = None
    freeze_backbone: bool = False
    # The streaming path for photos (Sec. 3.4): views, lighting noise, DataLoader workers.
    augment: str = "scale"
    crop_size: int = 224
    scale: list[int] | None = None
    lighting: float = 0.1
    workers: int | None = None


# What only the streaming path reads, and TrainConfig's defaults, to tell what was asked for.
_STREAMING_ONLY = ("augment", "crop_size", "scale", "lighting", "workers")
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def refuse_below(at_least: dict[str, tuple[int | None, int]]) -> None:
    """A one-line ValueError naming the first flag whose value is below its least (None: unset)."""
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be at least {low}")


def refuse_not_positive(values: dict[str, float | None]) -> None:
    """A one-line ValueError naming the first flag set to a number that is not finite and > 0."""
    for flag, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} {value}: must be a positive number")


def check_config(config: TrainConfig) -> None:
    """Refuse, in one line naming the flag, numbers no run can be trained with."""
    at_least = {
        "--iters": (config.iters, 1),
        "--batch-size": (config.batch_size, 1),
        "--width": (config.width, 1),
        "--checkpoint-every": (config.checkpoint_every, 1),
        "--eval-every": (config.eval_every, 1),
        "--val-split": (config.val_split, 0),
        "--image-size": (config.image_size, 1),
        "--crop-size": (config.crop_size, 1),
        "--workers": (config.workers, 0),
        "--seed": (config.seed, 0),
    }
    refuse_below(at_least)
    if config.seed >= 2**63:
        raise ValueError(f"--seed {config.seed}: must be below 2**63")
    refuse_not_positive({"--epochs": config.epochs, "--lr": config.lr})
    if config.freeze_backbone and not config.init:
        raise ValueError("--freeze-backbone trains the fc alone: it needs --init WEIGHTS")
    if not (math.isfinite(config.lighting) and config.lighting >= 0):
        raise ValueError(f"--lighting {config.lighting}: must be a number >= 0 (0: off)")
    if config.scale is not None and not 0 < config.scale[0] <= config.scale[1]:
        raise ValueError(f"--scale {config.scale[0]},{config.scale[1]}: must be 0 < LOW <= HIGH")
    sides = {"--image-size": config.image_size, "--crop-size": config.crop_size}
    sides["--scale"] = max(config.scale) if config.scale else None
    for flag, side in sides.items():
        if side is not None and side > MAX_SIDE:
            raise ValueError(f"{flag} {side}: sizes above {MAX_SIDE} pixels are refused")


# /proc/cpuinfo flags of CPUs with bf16 arithmetic units; elsewhere autocast emulates bf16.
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
_CPUINFO = Path("/proc/cpuinfo")
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU with bf16, a CPU with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return False
    flags = {
        flag
        for line in text.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    }
    return bool(flags & _NATIVE_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """fp32 or bf16: auto resolved for the device; a warning where bf16 would be emulated."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        # Measured: a ResNet-20 step on one thread of a 2-core AMD EPYC without AVX-512, 16
        # images/s in bf16 against 187 in fp32 (benchmarks/results/bf16-emulated-cpu-avx2-*).
        warnings.warn(
            f"--precision bf16: this {device.type} has no native bf16 units, so bf16 is emulated "
            "and training runs far slower than fp32 (ResNet-20 on a CPU without avx512_bf16: "
            "16 vs 187 images/s); --precision auto picks fp32 here",
            stacklevel=2,
        )
    return precision


class Diverged(FloatingPointError):
    """Training reached a non-finite loss or weights; the run keeps its last finite checkpoint."""


# Under torchrun the ranks agree on a stop signal at every log step and every this many steps
# between (one all_reduce of one number): a stop within seconds, with no sync every step.
STOP_CHECK_EVERY = 10


class RunInUse(OSError):
    """Another process is training the run directory."""


def _model_options(config: TrainConfig, num_classes: int, in_channels: int) -> dict:
    options = {"num_classes": num_classes, "in_channels": in_channels}
    if config.shortcut:
        if config.model.startswith("plain"):
            raise ValueError(f"--shortcut: {config.model} is a plain net; it has no shortcuts")
        options["shortcut"] = config.shortcut
    if config.width:
        options["width"] = config.width
    if config.stride_in:
        if model_family(config.model) != "imagenet":
            raise ValueError(f"--stride-in: {config.model} is a CIFAR net; it has no bottlenecks")
        options["stride_in_1x1"] = config.stride_in == "1x1"
    return options


def build_model(saved: dict) -> torch.nn.Module:
    """The net described by a run's config.json (weights not loaded)."""
    return create_model(saved["model"], **saved["model_options"])


def train(
    config: TrainConfig,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
    data_moved: bool = False,
) -> dict:
    """Train (or resume) a run; stop_at ends the session early at that iteration, resumably.

    data_moved: a resumed run's config.data is where its data is now (--resume RUN --data),
    recorded as the run's from here on.

    Returns the run's summary. A session ended by stop_at or by SIGINT/SIGTERM (checkpointed
    first) returns too, with "finished" false: a caller checks it before using the net, as
    the CLI does (exit status 130).

    Launched by `torchrun --nproc_per_node N -m deepres.cli train ...`, N processes train the
    run together with DDP: the recipe's batch size stays the global batch, split evenly.
    """
    check_config(config)
    asked = parse_device(config.device)
    # Global torch state a session sets (the seeds, determinism, cuDNN's autotuner, TF32, the
    # current GPU) is put back as it was after it: train() may be one call of a longer program.
    # Under torchrun a process is the run's alone, and reading every GPU's state would open a
    # context (memory) on each GPU from every rank: only a single process puts GPU state back.
    gpu_state = asked.type == "cuda" and distributed.world()[1] == 1
    current = torch.cuda.current_device() if gpu_state else None
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    # torch.manual_seed seeds every GPU: every GPU's generator is kept.
    devices = list(range(torch.cuda.device_count())) if gpu_state else []
    device = distributed.setup(asked)
    try:
        # Holds what the session must let go of however it ends: the run directory's lock.
        with ExitStack() as held, torch.random.fork_rng(devices=devices):
            return _train(config, resume, stop_at, progress, device, held, data_moved)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        distributed.teardown()
        if current is not None:
            torch.cuda.set_device(current)


def _train(
    config: TrainConfig,
    resume: bool,
    stop_at: int | None,
    progress: bool,
    device: torch.device,
    held: ExitStack,
    data_moved: bool = False,
) -> dict:
    s = _setup(config, resume, device, held, data_moved)
    recipe = s.recipe
    # A saved window holds the sums over all ranks: rank 0 carries them on.
    window = _Window(s.state["window"] if s.main else [0.0, 0.0, 0], s.device)
    start_iter = iteration = s.state["iteration"]
    bar = tqdm(
        total=recipe.iters,
        initial=start_iter,
        disable=not (progress and s.main),
        unit="it",
        dynamic_ncols=True,
        desc=config.model,
    )
    # Timed from this session's start: a resumed window's earlier images took no time here.
    t_window, timed_from = time.perf_counter(), iteration
    agreed_stop = False
    with _stop_signals() as stop:
        try:
            while iteration < recipe.iters:
                lr = recipe.lr_at(iteration, s.state["warming_up"])
                # Only a failure while the batch is fetched leaves the state as it was after
                # the last step, to checkpoint: a worker's death reported mid-step (PyTorch
                # raises it wherever the main thread is) ends the run at its last checkpoint.
                try:
                    x, y = s.stream.batch(iteration)
                except (DataError, RuntimeError) as error:
                    if isinstance(error, RuntimeError) and not worker_died(error):
                        raise
                    raise _batch_failed(s, iteration, window, error) from None
                _step(s, x, y, lr, window)
                iteration += 1
                bar.update(1)

                if iteration % s.log_every == 0 or iteration == recipe.iters:
                    # Sums over the ranks: the record covers the global batch, and a signal that
                    # any rank caught stops them all at this same step.
                    loss_sum, err_sum, images, stops = window.sums(stop.raised)
                    agreed_stop = stops > 0
                    # Checked here, where the loss reaches the host anyway: no sync per step.
                    s.last_loss = loss_sum / images
                    if not math.isfinite(s.last_loss):
                        raise _diverged(s, iteration, "the training loss")
                    timed = (
                        (iteration - timed_from)
                        * recipe.batch_size
                        / (time.perf_counter() - t_window)
                    )
                    _log(s, iteration, lr, loss_sum, err_sum, images, timed, bar)
                    window.reset()
                    t_window, timed_from = time.perf_counter(), iteration
                elif s.world_size > 1 and iteration % STOP_CHECK_EVERY == 0:
                    # Between log steps too: torchrun kills its workers 30 s after a SIGTERM,
                    # and 50 steps of a large net on CPUs take longer than that.
                    agreed_stop = distributed.any_rank(stop.raised, s.device)

                due = iteration % config.checkpoint_every == 0 or iteration == recipe.iters
                # Under torchrun the ranks must stop at the same step: a signal counts once agreed.
                signalled = agreed_stop if s.world_size > 1 else stop.raised
                halt = signalled or (stop_at is not None and iteration >= stop_at)
                if due or halt:
                    _save(s, iteration, window)
                if halt:
                    break
        finally:
            bar.close()

    # The others read the metrics.jsonl that rank 0 has just finished.
    distributed.barrier()
    return _finish(s, iteration, start_iter)


# ---- set-up: the run directory, the data, the recipe, the net, and a fresh or resumed state


@dataclass
class _Session:
    """What one training session works with, from set-up to its last step."""

    config: TrainConfig
    run: Path
    device: torch.device
    main: bool
    world_size: int
    recipe: Recipe
    steps_per_epoch: int
    log_every: int
    eval_every: int
    model: torch.nn.Module
    replica: torch.nn.Module
    optimizer: torch.optim.Optimizer
    preprocess: Preprocess
    stream: BatchStream | PhotoStream
    amp: torch.autocast
    graph: GraphedStep | None
    eval_split: str | None
    eval_images: torch.Tensor | None
    eval_labels: torch.Tensor | None
    state: dict
    seconds_before: float
    # The iteration of the checkpoint on disk, None before a new run's first.
    saved_at: int | None
    last_loss: float = math.nan
    t_session: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Training seconds of the whole run so far, earlier sessions included."""
        return self.seconds_before + time.perf_counter() - self.t_session


def _setup(
    config: TrainConfig,
    resume: bool,
    device: torch.device,
    held: ExitStack,
    data_moved: bool = False,
) -> _Session:
    rank, world_size = distributed.world()
    main = rank == 0
    run = Path(config.out)
    _check_run_dir(run, resume, probe=main)
    init_weights, init_from = None, None
    if config.init and not resume:
        # Found now, not after minutes of decoding: a typo, another net's weights.
        check_init(config.init, config.model)
        init_weights, init_from = read_init(config.init)
    data = Path(config.data).expanduser()
    if not resume and data.is_dir() and run.resolve().is_relative_to(data.resolve()):
        # In an image folder its plots would be read as images, its folder as a class.
        raise ValueError(f"--out {run}: inside the training data {config.data}; choose another")
    if main and resume:
        # Before the data is decoded and moved: a second session learns at once that it is one.
        held.enter_context(hold_run(run))
    # Every rank has looked before rank 0 writes config.json.
    distributed.barrier()
    if config.deterministic and device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, set before its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config.deterministic)
    torch.backends.cudnn.benchmark = not config.deterministic
    # Resolved once per session; a new run saves it resolved, so a resume elsewhere keeps it.
    precision = resolve_precision(config.precision, device)
    config = replace(config, precision=precision)
    if precision == "fp32":
        # PyTorch lets cuDNN run fp32 convolutions in TF32 on Ampere and later GPUs: a run that
        # says fp32 computes in fp32 (train() puts the settings back after; eval does the same).
        held.enter_context(no_tf32())

    # Data, by one of two paths chosen here: an ImageNet net on photos (an image folder or tar
    # shards, no --image-size) streams them through DataLoader workers; anything else is
    # decoded once and moved whole to the device.
    if resume and config.data not in NAMED_DATA and not Path(config.data).expanduser().exists():
        where = (
            ""
            if data_moved
            else f", where {run} trained on it; --resume RUN --data PATH goes on where it moved"
        )
        raise DataError(f"{config.data}: no such file or directory{where}")
    # Listed once, here: a folder of a million photos takes a while to walk.
    opened = None
    if config.image_size is None and model_family(config.model) == "imagenet":
        opened = streamable_splits(config.data, ["train"] if config.val_split else None)
    streaming = opened is not None
    augment = None
    if streaming:
        sizes = {"sizes": tuple(config.scale)} if config.scale else {}
        augment = Augment.scaled(config.augment, config.crop_size, **sizes)
        workers = default_workers() if config.workers is None else config.workers
        photos = open_photos(
            config.data, config.val_split, augment, workers, decode_eval=main, opened=opened
        )
        eval_split, eval_images, eval_labels = (
            photos.eval_split,
            photos.eval_images,
            photos.eval_labels,
        )
        classes, n_train, source = photos.train.classes, len(photos.train), photos.train.source
        input_size = [3, augment.crop, augment.crop]
    else:
        dataset, train_idx, (eval_split, eval_images, eval_labels) = _open_data(config)
        classes, n_train, source = dataset.classes, len(train_idx), dataset.source
        input_size = list(dataset.images.shape[1:])
        unused = [
            f"--{name.replace('_', '-')}"
            for name in _STREAMING_ONLY
            if getattr(config, name) != _DEFAULTS[name]
        ]
        if unused and main and not resume:
            warnings.warn(
                f"{', '.join(unused)}: settings of the streaming path (an ImageNet net on photos);"
                " this run's data is decoded whole and augmented by pad-4 crops and flips,"
                " so they are not used",
                stacklevel=2,
            )
    if len(classes) < 2:
        raise ValueError(f"{source}: one class ({classes[0]}) only; a classifier needs two or more")
    if resume:
        saved = read_config(run)
        _check_same_data(run, saved, config.data, classes, n_train, eval_labels)
        sha = saved.get("data_sha256")
        if main and not streaming and sha and sha != dataset.fingerprint():
            # Other pixels of as many images in the same classes: another JPEG decoder, say.
            warnings.warn(
                f"{config.data}: its images differ in content from those {run} started on "
                "(another sha256 of the decoded pixels); resuming on them",
                stacklevel=2,
            )
        recipe = _saved_recipe(run, saved, config)
        steps_per_epoch = saved.get("steps_per_epoch") or n_train // recipe.batch_size
    else:
        recipe, steps_per_epoch = _recipe(config, n_train, streaming)
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
    model = create_model(config.model, **model_options)
    if config.init and not resume:
        # Fine-tuning: every weight but the fc; a resumed run has them all in its checkpoint.
        if main:
            _warn_init_input(config, normalize, input_size)
        load_backbone(model, config.init, init_weights)
        bottlenecks = any(isinstance(m, Bottleneck) for m in model.modules())
        if bottlenecks and not config.stride_in and init_source(config.init) is None:
            # Weights from elsewhere (torchvision's .pth, timm's or the Hub's .safetensors): their
            # shapes fit a v1 net's, so nothing else would tell.
            warnings.warn(
                f"--init {config.init}: torchvision's ResNet-50/101/152 weights are v1.5 (the "
                "stride in the 3x3 conv) and load into this v1 net without an error; for those, "
                "pass --stride-in 3x3 (--stride-in 1x1 keeps v1 and this warning away)",
                stacklevel=2,
            )
    if config.freeze_backbone:
        freeze_backbone(model)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
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
        train_images = dataset.images[train_idx]
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
    if main and not resume:
        held.enter_context(hold_run(run))
    if resume:
        state = load_checkpoint(run, model, optimizer)
        if main:
            _truncate_metrics(run / METRICS, state["iteration"])
            _record_lr(run, config, state["iteration"])
            _record_precision(run, config.precision, state["iteration"])
            _record_resume(run, state["iteration"], device, config, source, data_moved)
    else:
        state = {
            "iteration": 0,
            "warming_up": recipe.warmup_lr is not None,
            "seconds": 0.0,
            "window": [0.0, 0.0, 0],
        }
        if main:
            saved = {
                "config": {k: v for k, v in asdict(config).items() if k != "out"},
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
                # How many images each held-out error is over (its standard error needs it).
                "eval_images": None if eval_labels is None else len(eval_labels),
                # Where a fine-tuned run's weights came from, as --init alone cannot say once
                # the file is replaced or the run trains on.
                "init_source": init_from,
                "data_source": source,
                # config.data stays as given; this finds the data from another folder.
                "data_path": absolute_data(config.data),
                "augment": asdict(augment) if streaming else None,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "git_commit": git_commit(),
                # True: trained with code that differs from that commit.
                "git_dirty": git_dirty(),
                # Where it started: the CPU and its flags, and the GPU where one is in use.
                "device": _device_name(device),
            }
            if not streaming:
                # The same images wherever they lie: a copy elsewhere is still this run's data.
                saved["data_sha256"] = dataset.fingerprint()
            write_json(run / CONFIG, saved)
            save_tensors(run / PREPROCESS, saved_statistics)
            write_text(run / METRICS, "")
    # DDP averages the gradients over the ranks (the paper's CIFAR batch of 128 was split over
    # two GPUs, Sec. 4.2); BN statistics stay per rank, with no SyncBN.
    replica = distributed.wrap(model, device)
    if config.compile:
        # Fuses BN, ReLU and the additions around the convolutions: at most a few percent on
        # the project's 2-core CPUs (benchmarks/step_variants.py), after a compile of 30-45 s.
        replica = torch.compile(replica)
    # Rank 0 alone evaluates, on the unwrapped net: no collective waits on the others.
    if not main:
        eval_images = None
    if eval_images is not None and not streaming:
        # Small decoded sets live on the device; streamed photos' held-out views (7.5 GB for
        # ImageNet's 50,000) stay on the host, pinned, and go over a chunk at a time.
        eval_images = eval_images.to(device)
    elif eval_images is not None and device.type == "cuda":
        eval_images = eval_images.pin_memory()
    return _Session(
        config=config,
        run=run,
        device=device,
        main=main,
        world_size=world_size,
        recipe=recipe,
        steps_per_epoch=steps_per_epoch,
        log_every=log_every,
        eval_every=eval_every,
        model=model,
        replica=replica,
        optimizer=optimizer,
        preprocess=preprocess,
        stream=stream,
        amp=torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        graph=(
            GraphedStep(model, optimizer, precision == "bf16")
            if config.cuda_graph
            and device.type == "cuda"
            and world_size == 1
            and not config.compile
            else None
        ),
        eval_split=eval_split,
        eval_images=eval_images,
        eval_labels=eval_labels,
        state=state,
        seconds_before=state["seconds"],
        saved_at=state["iteration"] if resume else None,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = machine()
    flags = cpu["cpu_flags"]
    return f"{cpu['cpu']} ({' '.join(flags)})" if flags else cpu["cpu"]


@contextmanager
def hold_run(run: Path) -> Iterator[None]:
    """The run directory locked for this session: two at once would interleave their records
    and overwrite each other's checkpoints. The kernel lets go if the process dies."""
    fd = os.open(run, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(
                f"{run}: another process is training this run; stop it first (SIGTERM "
                "checkpoints it) or wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)


def _warn_init_input(config: TrainConfig, normalize: str, input_size: list[int]) -> None:
    """Say where the new run's input differs from the one the --init weights learned on."""
    source = init_source(config.init)
    if source is None:
        if normalize == "pixel":
            if model_family(config.model) == "imagenet":
                # torchvision's and timm's weights learned on per-channel normalised photos.
                warnings.warn(
                    f"--init {config.init}: torchvision's and timm's weights learned on "
                    "per-channel normalised images; this run subtracts a mean image and does "
                    "not divide by a std (--normalize channel normalises as they did)",
                    stacklevel=3,
                )
        return
    if not (source / CONFIG).is_file():  # a folder of weights alone: nothing to compare
        return
    saved = read_config(source)
    theirs = (saved.get("normalize", "pixel"), saved["input_size"])
    if theirs != (normalize, input_size):
        warnings.warn(
            f"--init {config.init}: learned on {theirs[1][1]}x{theirs[1][2]} images with "
            f"{theirs[0]} normalisation; this run feeds {input_size[1]}x{input_size[2]} with "
            f"{normalize} normalisation, its statistics fitted on its own data",
            stacklevel=3,
        )


def _check_run_dir(run: Path, resume: bool, probe: bool = True) -> None:
    if resume and not run.exists():
        raise FileNotFoundError(f"{run}: no such run directory")
    if resume and not (run / CHECKPOINT).is_file():
        raise FileNotFoundError(
            f"{run / CHECKPOINT}: no checkpoint to resume from; remove {run} and start again"
        )
    if run.exists() and not run.is_dir():
        raise FileExistsError(f"{run}: a file, not a folder; choose another --out")
    started = (run / CONFIG).exists()
    if not resume and started and not (run / CHECKPOINT).exists() and not (run / SUMMARY).exists():
        # Out of memory at the first step, say: --resume would find nothing to go on from. Or
        # still before its first checkpoint, in another process: RunInUse says so instead.
        # Rank 0 alone asks (probe): under torchrun the ranks would take the lock from each other.
        if not probe:
            raise FileExistsError(f"{run}: holds a run not yet checkpointed (rank 0 says more)")
        with hold_run(run):
            pass
        raise FileExistsError(
            f"{run}: holds a run that stopped before its first checkpoint, so there is nothing "
            "to resume; remove it to start again, or choose another --out"
        )
    if not resume and started:
        raise FileExistsError(f"{run}: already holds a run; --resume {run} or choose another --out")
    # A new run writes model.safetensors, metrics.jsonl and more: never over someone's files.
    if not resume and run.is_dir() and any(run.iterdir()):
        raise FileExistsError(f"{run}: a folder with files in it, not a run; choose another --out")


def _open_data(config: TrainConfig) -> tuple[ImageDataset, torch.Tensor, tuple]:
    """The training set, the indices trained on, and the split evaluated (name, images, labels)."""
    # Decoded once, held out with a fixed seed; the loader moves it whole to the device.
    dataset = open_dataset(config.data, "train", image_size=config.image_size)
    train_idx, val_idx = split_train_val(len(dataset.labels), config.val_split)
    if config.val_split:
        return dataset, train_idx, ("val", dataset.images[val_idx], dataset.labels[val_idx])
    if "test" in available_splits(config.data):
        test = open_dataset(config.data, "test", image_size=config.image_size)
        (height, width), (train_height, train_width) = (
            test.images.shape[2:],
            dataset.images.shape[2:],
        )
        if (height, width) != (train_height, train_width):
            raise DataError(
                f"{config.data}: its test images are {width}x{height}, its training images "
                f"{train_width}x{train_height}; --image-size N resizes both"
            )
        # One colour image among gray ones makes a split RGB: seen as the net's input is.
        images = match_channels(test.images, dataset.images.shape[1])
        return dataset, train_idx, ("test", images, test.labels)
    return dataset, train_idx, (None, None, None)


def _recipe(config: TrainConfig, n_train: int, photos: bool) -> tuple[Recipe, int]:
    """The paper's recipe, scaled to the budget asked for, and the steps of one epoch."""
    recipe = get_recipe(config.recipe or default_recipe(config.model, photos=photos))
    if config.batch_size:
        recipe = replace(recipe, batch_size=config.batch_size)
    if config.lr is not None:
        recipe = replace(recipe, lr=config.lr)
    steps_per_epoch = n_train // recipe.batch_size
    if config.epochs is not None:
        recipe = recipe.scaled(max(1, round(config.epochs * steps_per_epoch)))
    elif config.iters is not None:
        recipe = recipe.scaled(config.iters)
    elif recipe.epochs is not None:
        # 90 epochs of ImageNet are 450,360 iterations; of 10,000 photos, 3,510.
        recipe = recipe.scaled(max(1, recipe.epochs * steps_per_epoch))
    return recipe, steps_per_epoch


def _saved_recipe(run: Path, saved: dict, config: TrainConfig) -> Recipe:
    """The recipe a run started with, as its config.json recorded it (--lr given anew wins)."""
    # A resume goes on with it even where this code's recipe of that name changed since: a
    # field added later takes its default, which is how the run trained before it existed.
    known = {f.name for f in fields(Recipe)}
    try:
        recipe = Recipe(**{k: v for k, v in saved["recipe"].items() if k in known})
        recipe = replace(recipe, milestones=tuple(recipe.milestones))
    except (TypeError, AttributeError):
        raise ValueError(f"{run / CONFIG}: its settings are damaged") from None
    return recipe if config.lr is None else replace(recipe, lr=config.lr)


def _check_same_data(
    run: Path,
    saved: dict,
    data: str,
    classes: list[str],
    n_train: int,
    eval_labels: torch.Tensor | None,
) -> None:
    """Refuse to resume a run on data other than it started on: its split would move."""
    # The held-out images are drawn from the image count: one image more or less and most of
    # them would be trained on from here, and a renamed class would swap labels mid-run.
    n_eval = None if eval_labels is None else len(eval_labels)
    why = None
    if saved.get("classes") != classes:
        before, now = saved.get("classes") or [], classes
        gone = [c for c in before if c not in now][:3]
        new = [c for c in now if c not in before][:3]
        why = (
            "other classes"
            + (f": no {', '.join(gone)}" if gone else "")
            + (f"{';' if gone else ':'} new {', '.join(new)}" if new else "")
            + ("" if gone or new else " in another order")
        )
    elif "n_train" in saved and saved["n_train"] != n_train:
        why = f"{_count(saved['n_train'])} training images then, {_count(n_train)} now"
    elif "eval_images" in saved and saved["eval_images"] != n_eval:
        why = f"{_count(saved['eval_images'])} held-out images then, {_count(n_eval)} now"
    if why:
        raise ValueError(
            f"{data}: not the data {run} started on ({why}); resume it on that data, "
            "or train a new run"
        )


def _count(n: int | None) -> str:
    return "none" if n is None else f"{n:,}"


# ---- the loop's parts: one step, the window of sums it feeds, a log record, a checkpoint


class _Window:
    """Loss and error sums since the last log record, accumulated on the device."""

    def __init__(self, saved: list, device: torch.device) -> None:
        loss, err, self.n = saved
        self.device = device
        self.loss = torch.tensor(loss, device=device)
        self.err = torch.tensor(err, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one step's batch in; no host sync."""
        self.loss += loss.detach().float() * len(y)
        self.err += (logits.detach().argmax(1) != y).sum()
        self.n += len(y)

    def sums(self, *extra: float) -> list[float]:
        """Loss sum, error count and images over all ranks, then each extra value summed."""
        return distributed.sum_over_ranks([self.loss, self.err, self.n, *extra], self.device)

    def reset(self) -> None:
        """Start the next window."""
        self.loss.zero_()
        self.err.zero_()
        self.n = 0


def _step(s: _Session, x: torch.Tensor, y: torch.Tensor, lr: float, window: _Window) -> None:
    if s.graph is not None:
        loss, logits = s.graph(x, y, lr)
    else:
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        with s.amp:
            logits = s.replica(x)
            loss = F.cross_entropy(logits, y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
    # Accumulated on the device: no host sync inside a step.
    window.add(loss, logits, y)


class GraphedStep:
    """One training step captured as a CUDA graph and replayed: one launch instead of hundreds.

    A CIFAR net's step is bound by the host launching its kernels one by one (the GPU was 11-20%
    busy, README); a replay launches them all at once. The learning rate is baked into the
    captured SGD kernels, so a new one (or a new batch shape) is captured anew: a few times a run.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool):
        self.model, self.optimizer = model, optimizer
        # Autocast's cache of cast weights would hold tensors from outside the graph's pool.
        self.amp = torch.autocast("cuda", torch.bfloat16, enabled=bf16, cache_enabled=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        # A capture stream on the net's own GPU: torch.cuda.graph's default one is made once per
        # process, on the GPU current then, and a later run on another GPU would capture there.
        self.stream = torch.cuda.Stream(next(model.parameters()).device)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the step on (x, y) at lr; the loss and logits, overwritten by the next step."""
        shapes = (x.shape, x.stride(), y.shape)
        if (lr, shapes) != self.key:
            # New shapes would have cuDNN search its algorithms, which a capture cannot do.
            self._capture(x, y, lr, warm=self.key is None or self.key[1] != shapes)
            self.key = (lr, shapes)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss, self.logits

    def _forward_backward(self) -> None:
        with self.amp:
            self.logits = self.model(self.x)
            self.loss = F.cross_entropy(self.logits, self.y)
        self.loss.backward()
        self.optimizer.step()

    def _capture(self, x: torch.Tensor, y: torch.Tensor, lr: float, warm: bool) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.graph is not None:
            self.graph.reset()
        if warm:
            self._warm_up(x, y)
        self.x, self.y = x.clone(), y.clone()
        # The last loss would hold its autograd graph alive, with gradient nodes of another
        # stream than the capture's (torch warns of the mismatch).
        self.loss = self.logits = None
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        # Capturing records the kernels without running them: the weights stay as they are.
        # thread_local: the photo loader's pin-memory thread may call CUDA meanwhile.
        try:
            with torch.cuda.graph(
                self.graph, stream=self.stream, capture_error_mode="thread_local"
            ):
                self._forward_backward()
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise RuntimeError(
                f"capturing the training step as a CUDA graph failed ({first}); --no-cuda-graph "
                "launches it kernel by kernel"
            ) from error

    def _warm_up(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # Capture needs a few eager steps first (cuDNN's algorithm search, lazy state), taken on
        # a side stream; they would train, so the weights, BN statistics and momentum go back.
        state = [*self.model.state_dict().values()]
        saved = [t.clone() for t in state]
        slots = self.optimizer.state.items()
        momentum = {p: {k: v.clone() for k, v in s.items()} for p, s in slots}
        self.x, self.y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._forward_backward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for t, v in zip(state, saved, strict=True):
                t.copy_(v)
            for p, slots in self.optimizer.state.items():
                for k, t in slots.items():
                    # With no dampening, a zero buffer steps as SGD's first step does without one.
                    t.copy_(momentum[p][k]) if p in momentum else t.zero_()


def _log(
    s: _Session,
    iteration: int,
    lr: float,
    loss_sum: float,
    err_sum: float,
    images: float,
    images_per_sec: float,
    bar: tqdm,
) -> None:
    record = {
        "iteration": iteration,
        "epoch": round(iteration / s.steps_per_epoch, 3),
        "train_loss": loss_sum / images,
        "train_error": 100.0 * err_sum / images,
        "images": int(images),
        "lr": lr,
        "precision": s.config.precision,
        "images_per_sec": images_per_sec,
    }
    recipe = s.recipe
    if s.state["warming_up"] and recipe.warmed_up(record["train_error"] / 100):
        s.state["warming_up"] = False
    if s.eval_images is not None and (iteration % s.eval_every == 0 or iteration == recipe.iters):
        logits = predict_logits(
            s.model, s.eval_images, s.preprocess, channels_last=s.config.channels_last
        )
        record[f"{s.eval_split}_error"] = error_rates(logits, s.eval_labels)["top1_error"]
    s.state["seconds"] = s.seconds()
    record["seconds"] = round(s.state["seconds"], 3)
    if s.main:
        append_text(s.run / METRICS, json.dumps(record) + "\n")
    bar.set_postfix(
        loss=f"{record['train_loss']:.3f}",
        err=f"{record['train_error']:.1f}%",
        lr=f"{lr:g}",
        ips=f"{record['images_per_sec']:.0f}",
    )


def _save(s: _Session, iteration: int, window: _Window) -> None:
    # Summed over the ranks, so that all of them refuse together.
    loss_sum, err_sum, images, broken = window.sums(~_finite(s.model, s.optimizer))
    if images:
        s.last_loss = loss_sum / images
    if broken or not math.isfinite(loss_sum):
        raise _diverged(s, iteration, "the weights" if broken else "the training loss")
    s.state["iteration"] = iteration
    s.state["seconds"] = s.seconds()
    s.state["window"] = [loss_sum, err_sum, int(images)]
    if s.main:
        # The records up to here first: a crash cannot leave a checkpoint beyond its metrics.
        sync_file(s.run / METRICS)
        # The unwrapped net's names, so that runs resume with or without torchrun.
        save_checkpoint(s.run, s.model, s.optimizer, s.state)
        # The iteration goes with the weights: eval, deepres.load and export can say what they
        # hold while the run goes on.
        save_tensors(s.run / WEIGHTS, s.model.state_dict(), {"iteration": iteration})
    s.saved_at = iteration


def _finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether every weight, BN statistic and momentum buffer is finite (one device tensor)."""
    tensors = [*model.state_dict().values()]
    tensors += [v for slots in optimizer.state.values() for v in slots.values()]
    checks = [t.isfinite().all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return torch.stack(checks).all()


def worker_died(error: BaseException) -> bool:
    """Whether an error is PyTorch's for a DataLoader worker killed or gone (often: no memory)."""
    return isinstance(error, RuntimeError) and str(error).startswith("DataLoader worker")


def _batch_failed(s: _Session, iteration: int, window: _Window, error: Exception) -> Exception:
    # A streamed photo is first read when its batch comes, maybe hours in: keep what was trained
    # (the batch was not), and say how to go on. Under torchrun the other ranks wait in a
    # collective, so no rank can save alone.
    if s.world_size > 1:
        return error
    _save(s, iteration, window)
    kept = f"{s.run} is checkpointed at iteration {iteration}"
    if isinstance(error, DataError):
        return DataError(
            f"{error}; {kept}: replace the file with a readable image of the same name (a "
            f"resume reads the photos in the same order) and deepres train --resume {s.run}"
        )
    cause = str(error).splitlines()[0].strip()
    return ChildProcessError(
        f"{cause} (the system may be out of memory: fewer --workers use less); {kept}: "
        f"deepres train --resume {s.run}"
    )


def _diverged(s: _Session, iteration: int, what: str) -> Diverged:
    run = s.run
    if s.saved_at is None:
        kept = f"no checkpoint was saved: remove {run} and start again with a lower --lr"
    else:
        # --lr sets the schedule's base rate; a milestone or the warm-up may have lowered the
        # rate of the steps that diverged (the last one's index is iteration - 1).
        rate = s.recipe.lr_at(iteration - 1, s.state["warming_up"])
        was = f"{s.recipe.lr:g}" + (f", {rate:g} in its last steps" if rate != s.recipe.lr else "")
        kept = (
            f"{run / CHECKPOINT} keeps iteration {s.saved_at}, the last finite state: "
            f"deepres train --resume {run} --lr LOWER (it was {was})"
        )
    return Diverged(
        f"{run}: training diverged at iteration {iteration}: {what} is not finite "
        f"(train loss {s.last_loss:g}); {kept}"
    )


# ---- stopping and finishing


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop can stop between steps and checkpoint first."""

    def __init__(self) -> None:
        self.raised = False

    def __call__(self, signum, frame) -> None:
        self.raised = True


@contextmanager
def _stop_signals() -> Iterator[_StopFlag]:
    """A flag that SIGINT and SIGTERM raise while inside; the old handlers come back after."""
    stop = _StopFlag()
    previous = (
        {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _finish(s: _Session, iteration: int, start_iter: int) -> dict:
    run, recipe, eval_split = s.run, s.recipe, s.eval_split
    finished = iteration >= recipe.iters
    summary = {
        "run": str(run),
        "model": s.config.model,
        "iteration": iteration,
        "iters": recipe.iters,
        "finished": finished,
        "seconds": s.state["seconds"],
    }
    metrics = read_metrics(run)
    if metrics:
        # As every report gives them: the mean over the run's last 1/128, not its last record.
        summary["train_error"], summary["train_loss"] = final_training(metrics)
        evaluated = [m for m in metrics if f"{eval_split}_error" in m]
        if evaluated:
            summary[f"{eval_split}_error"] = evaluated[-1][f"{eval_split}_error"]
            summary["eval_split"] = eval_split
        summary["images_per_sec"] = (
            (iteration - start_iter)
            * recipe.batch_size
            / max(s.state["seconds"] - s.seconds_before, 1e-9)
        )
    if s.main:
        plot_run(run)
        if finished:
            write_json(run / SUMMARY, summary)
    return summary


def _truncate_metrics(path: Path, iteration: int) -> None:
    # Records written after the checkpoint will be written again by the resumed run.
    if path.exists():
        kept = [m for m in read_metrics(path.parent) if m["iteration"] <= iteration]
        write_text(path, "".join(json.dumps(m) + "\n" for m in kept))


def _record_lr(run: Path, config: TrainConfig, iteration: int) -> None:
    # A resume with a new --lr (after a divergence, say) applies it from the checkpoint's
    # iteration on; config.json keeps it for later resumes, and when it changed.
    saved = read_json(run / CONFIG)
    if config.lr is None or saved["config"].get("lr") == config.lr:
        return
    saved["config"]["lr"] = config.lr
    saved["recipe"]["lr"] = config.lr
    saved.setdefault("lr_changes", []).append({"iteration": iteration, "lr": config.lr})
    write_json(run / CONFIG, saved)


def _record_precision(run: Path, precision: str, iteration: int) -> None:
    # As a new --lr: from the checkpoint's iteration on, kept for later resumes, and when.
    saved = read_json(run / CONFIG)
    before = saved["config"].get("precision", "fp32")
    if before == precision:
        return
    saved["config"]["precision"] = precision
    if before != "auto":  # an auto never resolved before (an old file) changes nothing
        saved.setdefault("precision_changes", []).append(
            {"iteration": iteration, "precision": precision}
        )
    write_json(run / CONFIG, saved)


def _record_resume(
    run: Path,
    iteration: int,
    device: torch.device,
    config: TrainConfig,
    source: str,
    data_moved: bool,
) -> None:
    # A run may go on on another machine, device, torch or code, compiled or not: config.json
    # keeps how each stretch after the first trained, so its numbers can say so.
    saved = read_json(run / CONFIG)
    data = config.data
    entry = {
        "iteration": iteration,
        "device": _device_name(device),
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "compile": config.compile,
    }
    if data_moved and absolute_data(data) != saved.get("data_path"):
        # Resumed with --data where the data moved: later resumes, eval and publish look there.
        # (A caller that gives the data each time, as reproduce does on a GPU machine, leaves
        # the run's own place as it was.)
        entry["data"] = absolute_data(data)
        saved["config"]["data"], saved["data_path"] = data, absolute_data(data)
        saved["data_source"] = source
    saved.setdefault("resumed", []).append(entry)
    write_json(run / CONFIG, saved)


def load_config(run: Path) -> TrainConfig:
    """The TrainConfig of a run, out set to where the run directory is now."""
    saved = read_config(run)
    # Older config.json files record out too: the directory given wins.
    known = {f.name for f in fields(TrainConfig)} - {"out"}
    # Runs from before --precision existed trained in fp32, not in what auto picks today.
    settings = {"precision": "fp32", **saved["config"]}
    try:
        config = TrainConfig(**{k: v for k, v in settings.items() if k in known}, out=str(run))
        check_config(config)
    except (TypeError, IndexError, KeyError, AttributeError):  # a number saved as a string, say
        raise ValueError(f"{Path(run) / CONFIG}: its settings are damaged") from None
    except ValueError as err:  # a setting no run can use, named by check_config
        raise ValueError(f"{Path(run) / CONFIG}: {err}") from None
    return replace(config, data=locate_data(config.data, saved.get("data_path")))
