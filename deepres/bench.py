"""`deepres bench`: deepres's training and inference paths timed against benchmarks/reference.py.

Both sides run on the same data in one process tree, one after the other: deepres here, through
train() itself, then the reference in a child process, run as a user runs a script. Training
rates are images/s per window of iterations; the first window (worker start-up, kernel choice,
allocator growth) is warm-up and dropped, and the median of the rest is reported.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from deepres.checkpoint import read_json, write_json
from deepres.data import open_dataset
from deepres.data.augment import Augment, Lighting
from deepres.data.loader import Preprocess, split_train_val
from deepres.data.stream import ImageFiles, PhotoStream, open_image_files
from deepres.inference import fold_batchnorm, parse_device
from deepres.models import create_model, model_family
from deepres.provenance import machine
from deepres.report import read_metrics
from deepres.train import TrainConfig, refuse_below, refuse_not_positive, train

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "benchmarks" / "reference.py"
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class TrainBench:
    """One training comparison: net, data, budget, and the settings both sides share."""

    model: str
    data: str
    iters: int = 60
    epochs: float | None = None
    windows: int = 6
    device: str = "cpu"
    batch_size: int = 128
    width: int | None = None
    val_split: int = 0
    workers: int = 2
    compile: bool = False
    precision: str = "fp32"


def _steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] or rates)


def bench_train(config: TrainBench, iters: int, workdir: Path) -> dict:
    """deepres's side: train() on a fresh run directory, images/s of each log window."""
    window = iters // config.windows
    run = TrainConfig(
        model=config.model,
        data=config.data,
        out=str(workdir / "run"),
        iters=iters,
        batch_size=config.batch_size,
        val_split=config.val_split,
        # Evaluation and checkpoints only after the last window, so no window times them.
        eval_every=iters,
        checkpoint_every=iters,
        log_every=window,
        device=config.device,
        width=config.width,
        compile=config.compile,
        precision=config.precision,
    )
    start = time.perf_counter()
    summary = train(run, progress=False)
    seconds = time.perf_counter() - start
    # A shorter last window (iters not a multiple of it) would time a different amount of work.
    rates = [
        m["images_per_sec"] for m in read_metrics(workdir / "run") if not m["iteration"] % window
    ]
    result = {"images_per_sec": _steady(rates), "windows": rates, "seconds": seconds}
    if config.val_split:
        result["val_error"] = summary["val_error"]
    return result


def _reference(args: list[str]) -> dict:
    if not REFERENCE.is_file():
        raise FileNotFoundError(
            f"{REFERENCE}: missing; `deepres bench` runs from a source checkout of deepres"
        )
    # stderr passes through, so the reference's own error message is what the user sees.
    done = subprocess.run(
        [sys.executable, str(REFERENCE), *args, "--json"], stdout=subprocess.PIPE, text=True
    )
    if done.returncode:
        raise ChildProcessError(f"{REFERENCE} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_train_benchmark(config: TrainBench, command: str = "") -> dict:
    """Train with deepres, then with the reference, on the same data; rates, ratio, context."""
    if not (re.fullmatch(r"resnet\d+", config.model) and model_family(config.model) == "cifar"):
        raise ValueError(
            f"bench train compares the CIFAR ResNets (resnet20 ...), not {config.model}"
        )
    if not (Path(config.data).is_dir() or zipfile.is_zipfile(config.data)):
        raise ValueError(
            f"{config.data}: the reference reads image folders: a folder or .zip of "
            "train/<class>/<image>"
        )
    if config.windows < 2:
        raise ValueError(
            f"--windows must be at least 2 (the first is warm-up), got {config.windows}"
        )
    # Resolved once, for both sides and the record: the reference takes no "auto".
    config = replace(config, device=str(parse_device(config.device)))
    refuse_below(
        {
            "--iters": (config.iters, 1),
            "--batch-size": (config.batch_size, 1),
            "--width": (config.width, 1),
            "--val-split": (config.val_split, 0),
            "--workers": (config.workers, 0),
        }
    )
    refuse_not_positive({"--epochs": config.epochs})
    context = environment(config.device, command)
    # Decoded (and cached) before the clock starts, as the reference's unzip is set-up too.
    n_images = len(open_dataset(config.data, "train").labels)
    _, held_out = split_train_val(n_images, config.val_split)
    iters = config.iters
    if config.epochs is not None:
        iters = max(1, round(config.epochs * ((n_images - config.val_split) // config.batch_size)))
    if iters < config.windows:
        raise ValueError(f"--iters {iters} is fewer than --windows {config.windows}")

    with tempfile.TemporaryDirectory(prefix="deepres-bench-") as tmp:
        print(
            f"deepres bench: deepres trains {config.model} for {iters} iterations", file=sys.stderr
        )
        ours = bench_train(config, iters, Path(tmp))
        split = Path(tmp) / "held_out.json"
        split.write_text(json.dumps({"n_images": n_images, "indices": held_out.tolist()}))
        print("deepres bench: the reference trains the same", file=sys.stderr)
        theirs = _reference(
            ["train", "--data", config.data, "--model", config.model, "--iters", str(iters)]
            + ["--windows", str(config.windows), "--batch-size", str(config.batch_size)]
            + ["--workers", str(config.workers), "--device", config.device]
            + (["--width", str(config.width)] if config.width else [])
            + (["--held-out", str(split)] if config.val_split else [])
        )

    result = {
        "benchmark": "train",
        "model": config.model,
        "data": config.data,
        "iters": iters,
        "window_iters": iters // config.windows,
        "batch_size": config.batch_size,
        "deepres_compile": config.compile,
        "deepres_precision": config.precision,
        "device": config.device,
        "deepres_images_per_sec": ours["images_per_sec"],
        "reference_images_per_sec": theirs["images_per_sec"],
        "ratio": ours["images_per_sec"] / theirs["images_per_sec"],
        "deepres_seconds": ours["seconds"],
        "reference_seconds": theirs["seconds"],
        "time_ratio": ours["seconds"] / theirs["seconds"],
        "reference_setup_seconds": theirs["setup_seconds"],
        "windows": {"deepres": ours["windows"], "reference": theirs["windows"]},
    }
    if config.width:
        result["width"] = config.width
    if config.val_split:
        result["val_split"] = config.val_split
        result["deepres_val_error"] = ours["val_error"]
        result["reference_val_error"] = theirs["val_error"]
    return {**result, **context}


def bench_infer(
    model: str, batch_size: int, iters: int, device: str, image_size: int = 224, warmup: int = 2
) -> list[float]:
    """deepres's inference path (BN folded, channels_last, inference_mode): images/s per pass."""
    device = torch.device(device)
    net = fold_batchnorm(create_model(model)).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    rates = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start = time.perf_counter()
            net(x.contiguous(memory_format=torch.channels_last))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                rates.append(batch_size / (time.perf_counter() - start))
    return rates


def run_infer_benchmark(
    model: str = "resnet50",
    batch_sizes: tuple[int, ...] = (32, 1),
    iters: int = 10,
    device: str = "cpu",
    image_size: int = 224,
    command: str = "",
) -> dict:
    """Forward passes of deepres's net and the reference's at each batch size; rates and ratios."""
    device = str(parse_device(device))  # the reference takes no "auto"
    refuse_below({"--iters": (iters, 1), "--image-size": (image_size, 1)})
    context = environment(device, command)
    ours = {b: bench_infer(model, b, iters, device, image_size) for b in batch_sizes}
    theirs = _reference(
        ["infer", "--model", model, "--batch-sizes", ",".join(map(str, batch_sizes))]
        + ["--iters", str(iters), "--image-size", str(image_size), "--device", device]
    )
    per_batch = {}
    for b in batch_sizes:
        deepres_rate = statistics.median(ours[b])
        reference_rate = theirs[str(b)]["images_per_sec"]
        per_batch[str(b)] = {
            "deepres_images_per_sec": deepres_rate,
            "reference_images_per_sec": reference_rate,
            "ratio": deepres_rate / reference_rate,
            "windows": {"deepres": ours[b], "reference": theirs[str(b)]["windows"]},
        }
    return {
        "benchmark": "infer",
        "model": model,
        "image_size": image_size,
        "iters": iters,
        "device": device,
        "batch_sizes": per_batch,
        **context,
    }


@dataclass
class DataBench:
    """The streaming loader against the reference's per-image PIL pipeline, same workers."""

    data: str
    batches: int = 16
    windows: int = 4
    batch_size: int = 32
    workers: int = 2
    augment: str = "scale"
    crop: int = 224
    model: str = "resnet18"
    # A ResNet-18 step of 32 images at 224 takes seconds on a CPU: time fewer, smaller ones.
    train_steps: int = 2
    train_batch_size: int = 8
    device: str = "cpu"


def bench_stream(files: ImageFiles, augment: Augment, config: DataBench) -> list[float]:
    """deepres's side: images/s of each window of PhotoStream batches, normalised, with lighting."""
    # Statistics of roughly ImageNet's size: their values do not change the work.
    preprocess = Preprocess(torch.full((3, 1, 1), 0.45), torch.full((3, 1, 1), 0.25))
    lighting = Lighting(torch.tensor([0.2, 0.02, 0.005]), torch.eye(3))
    device = torch.device(config.device)
    stream = PhotoStream(
        files,
        preprocess,
        config.batch_size,
        0,
        augment,
        lighting,
        device,
        config.workers,
        channels_last=True,
    )
    window = config.batches // config.windows
    rates = []
    t_window = time.perf_counter()
    for i in range(1, config.batches + 1):
        stream.batch(i - 1)
        if i % window == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(window * config.batch_size / (now - t_window))
            t_window = now
    stream.close()
    return rates


def bench_train_steps(
    model: str, num_classes: int, batch_size: int, crop: int, steps: int, device: str
) -> list[float]:
    """images/s of each of `steps` SGD steps of a net at crop x crop, after one warm-up step."""
    device = torch.device(device)
    net = create_model(model, num_classes=num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, crop, crop, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    rates = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            rates.append(batch_size / (time.perf_counter() - start))
    return rates


def run_data_benchmark(config: DataBench, command: str = "") -> dict:
    """Photos/s of deepres's streaming loader (draft on, off) and the reference's; a net's steps."""
    if config.windows < 2 or config.batches < config.windows:
        raise ValueError(
            f"need --windows >= 2 (the first is warm-up) and --batches >= --windows, got "
            f"--batches {config.batches} --windows {config.windows}"
        )
    if model_family(config.model) != "imagenet":
        raise ValueError(
            f"bench data times an ImageNet net's training (resnet18 ...), not {config.model}"
        )
    config = replace(config, device=str(parse_device(config.device)))
    refuse_below(
        {
            "--batch-size": (config.batch_size, 1),
            "--workers": (config.workers, 0),
            "--crop-size": (config.crop, 1),
            "--train-steps": (config.train_steps, 1),
            "--train-batch-size": (config.train_batch_size, 1),
        }
    )
    context = environment(config.device, command)
    files = open_image_files(config.data, "train")
    if Path(config.data).is_file():
        # Into the page cache first, so that neither side pays for the first read from disk.
        with open(config.data, "rb") as archive:
            while archive.read(1 << 24):
                pass
    augments = {
        draft: Augment.scaled(config.augment, config.crop, draft=draft) for draft in (True, False)
    }
    print(
        f"deepres bench: deepres streams {config.batches} batches, draft mode on, then off",
        file=sys.stderr,
    )
    ours = {draft: bench_stream(files, augment, config) for draft, augment in augments.items()}
    low, high = augments[True].sizes
    print("deepres bench: the reference loads the same", file=sys.stderr)
    theirs = _reference(
        ["data", "--data", config.data, "--batches", str(config.batches)]
        + ["--windows", str(config.windows), "--batch-size", str(config.batch_size)]
        + ["--workers", str(config.workers), "--augment", config.augment]
        + ["--crop-size", str(config.crop), "--scale", f"{low},{high}"]
    )
    print(f"deepres bench: {config.train_steps} training steps of {config.model}", file=sys.stderr)
    steps = bench_train_steps(
        config.model,
        len(files.classes),
        config.train_batch_size,
        config.crop,
        config.train_steps,
        config.device,
    )
    loader = _steady(ours[True])
    training = statistics.median(steps)
    result = {
        "benchmark": "data",
        "data": config.data,
        "n_images": len(files),
        "augment": config.augment,
        "crop": config.crop,
        "scale": [low, high],
        "batch_size": config.batch_size,
        "batches": config.batches,
        "window_batches": config.batches // config.windows,
        "workers": config.workers,
        "device": config.device,
        "deepres_images_per_sec": loader,
        "deepres_no_draft_images_per_sec": _steady(ours[False]),
        "draft_speedup": loader / _steady(ours[False]),
        "reference_images_per_sec": theirs["images_per_sec"],
        "ratio": loader / theirs["images_per_sec"],
        "train_model": config.model,
        "train_batch_size": config.train_batch_size,
        "train_images_per_sec": training,
        # Whether the loader alone delivers images as fast as the net alone consumes them.
        "keeps_up": loader >= training,
        "windows": {
            "deepres": ours[True],
            "deepres_no_draft": ours[False],
            "reference": theirs["windows"],
            "train_steps": steps,
        },
    }
    return {**result, **context}


def environment(device: str, command: str) -> dict:
    """When, where and with what a benchmark ran: date, command, torch, git commit, machine."""
    info = machine()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": info.pop("torch"),
        "git_commit": info.pop("git_commit"),
        "git_dirty": info.pop("git_dirty"),
        # Other work on the machine slows both sides: the load says how busy it was.
        "machine": {**info, "load_average": [round(x, 2) for x in os.getloadavg()]},
    }


def save_result(result: dict, results_dir: Path = RESULTS) -> Path:
    """Append a result to <results_dir>/<device>-<date>.json, keeping the runs already there."""
    device = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")
    path = Path(results_dir) / f"{device}-{result['date'][:10]}.json"
    runs = read_json(path)["runs"] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"device": result["device_name"], "runs": [*runs, result]})
    return path
