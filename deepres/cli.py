"""The `deepres` command line: parses arguments, calls the library, turns errors into one line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import torch
from PIL import Image

from deepres.bench import (
    RESULTS,
    DataBench,
    TrainBench,
    run_data_benchmark,
    run_infer_benchmark,
    run_train_benchmark,
    save_result,
)
from deepres.data import DataError, image_files
from deepres.distributed import world
from deepres.evaluate import PROTOCOLS, evaluate_run
from deepres.experiments import EXPERIMENTS, reproduce
from deepres.experiments.common import BUDGETS
from deepres.export import export_onnx
from deepres.inference import load
from deepres.models import create_model, list_models, model_family, model_stats
from deepres.pretrained import describe, publish, restore
from deepres.report import block_table, find_runs, plot_status, run_status
from deepres.train import PRECISIONS, TrainConfig, load_config, train, worker_died

# What `deepres --help` says before the commands.
DESCRIPTION = (
    "Deep residual learning (He et al., CVPR 2016): train the paper's nets, evaluate and use "
    "them, reproduce its experiments. Start with: deepres train --model resnet20 --data "
    "fashion-mnist --iters 2000 --out runs/first"
)


def _model_options(args: argparse.Namespace, name: str) -> dict:
    # A flag a net cannot take is refused for a net named, and passed over in the whole table.
    named = name in (args.names or [])
    options = {}
    if args.shortcut and name.startswith("plain"):
        if named:
            raise ValueError(f"--shortcut: {name} is a plain net; it has no shortcuts")
    elif args.shortcut:
        options["shortcut"] = args.shortcut
    if args.stride_in and model_family(name) != "imagenet":
        if named:
            raise ValueError(f"--stride-in: {name} is a CIFAR net; it has no bottlenecks")
    elif args.stride_in:
        options["stride_in_1x1"] = args.stride_in == "1x1"
    return options


def cmd_models(args: argparse.Namespace) -> None:
    """deepres models: the table of nets (or JSON), with their sizes."""
    names = args.names or list_models()
    rows = [model_stats(n, create_model(n, **_model_options(args, n))) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':<12}{'depth':>6}{'params':>14}{'GMACs':>9}  input")
    for r in rows:
        size = "x".join(map(str, r["input_size"]))
        print(f"{r['name']:<12}{r['depth']:>6}{r['params']:>14,}{r['macs'] / 1e9:>9.3f}  {size}")


def cmd_train(args: argparse.Namespace) -> None:
    """deepres train: a new run, or --resume of a stopped one."""
    # How it runs, not what it learns: only the flags given (None when not), so that a resumed
    # run keeps its own unless one is given, whatever its value.
    how_keys = ("device", "workers", "checkpoint_every", "compile", "cuda_graph")
    how = {k: getattr(args, k) for k in how_keys if getattr(args, k) is not None}
    if args.resume:
        # A resumed run keeps its configuration: a flag that would change it is refused rather
        # than silently ignored. --lr (after a divergence) may change, --precision (a bf16 run
        # going on on a GPU without bf16 units), and how it runs: the device, the workers, how
        # often it saves, whether it compiles (which resumes exactly).
        given = _given_flags(args.command_line)
        keep = {"resume", "lr", "precision", "quiet", "data", *how_keys}
        changed = [k for k in vars(args) if k in given and k not in keep]
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(
                f"{args.resume}: --resume continues the run as it was configured; {flags} cannot"
                " change it (only --data where the data moved, --lr, --precision, --device,"
                " --workers, --checkpoint-every, --compile and --cuda-graph can)"
            )
        config = load_config(args.resume)
        if args.lr is not None:
            config = replace(config, lr=args.lr)
        if "precision" in given:
            config = replace(config, precision=args.precision)
        if "data" in given:  # the same data somewhere else: checked to be the same below
            config = replace(config, data=args.data)
        config = replace(config, **how)
        summary = train(config, resume=True, progress=not args.quiet, data_moved="data" in given)
    else:
        if not (args.model and args.data and args.out):
            raise ValueError("--model, --data and --out are required (or --resume RUN)")
        config = TrainConfig(
            model=args.model,
            data=args.data,
            out=args.out,
            recipe=args.recipe,
            iters=args.iters,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            val_split=args.val_split,
            seed=args.seed,
            eval_every=args.eval_every,
            deterministic=args.deterministic,
            precision=args.precision,
            shortcut=args.shortcut,
            stride_in=args.stride_in,
            width=args.width,
            normalize=args.normalize,
            image_size=args.image_size,
            init=args.init,
            freeze_backbone=args.freeze_backbone,
            augment=args.augment,
            crop_size=args.crop_size,
            scale=args.scale,
            lighting=args.lighting,
            **how,
        )
        summary = train(config, progress=not args.quiet)
    # Under torchrun every rank returns the summary; one copy is enough on stdout.
    if world()[0] == 0:
        print(json.dumps(summary, indent=2))
    if not summary["finished"]:
        # Stopped by SIGINT/SIGTERM after a checkpoint: not a success for a script to go on from.
        raise KeyboardInterrupt(
            f"{summary['run']}: stopped at iteration {summary['iteration']}; "
            f"deepres train --resume {summary['run']} continues it"
        )


def _given_flags(command_line: str) -> set[str]:
    """The `deepres train` flags on a command line, given at whatever value, default or not."""
    probe = argparse.ArgumentParser(add_help=False)
    add_train_arguments(probe)
    # Parser-level defaults win over each flag's own: every flag not given reads as not_given.
    not_given = object()
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([])), not_given))
    parsed = vars(probe.parse_args(shlex.split(command_line)[2:]))  # after "deepres train"
    return {dest for dest, value in parsed.items() if value is not not_given}


def _file_to_write(text: str) -> Path:
    # Path("") is Path("."), the folder here: an empty argument would be written over it.
    if not text:
        raise argparse.ArgumentTypeError("give the path of the file to write")
    return Path(text)


def _sizes(text: str) -> list[int]:
    try:
        low, high = (int(side) for side in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in pixels, got {text!r}") from None
    return [low, high]


def cmd_eval(args: argparse.Namespace) -> None:
    """deepres eval: top-1/top-5 error of a run or shipped net under a protocol."""
    try:
        scales = tuple(int(s) for s in args.scales.split(",")) if args.scales else None
    except ValueError:
        raise ValueError(f"--scales takes sizes such as 224,256, not {args.scales!r}") from None
    result = evaluate_run(
        args.run,
        args.data,
        args.split,
        args.device,
        args.protocol,
        args.resize,
        args.crop,
        scales,
        progress=True,
    )
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "classes"}, indent=2))
        return
    print(
        f"{args.run}{_trained(result)} on {result['data']} ({result['split']}, "
        f"{result['n']} images, {result['protocol']})"
    )
    print(f"top-1 error {result['top1_error']:.2f}%   top-5 error {result['top5_error']:.2f}%")
    print(f"{'class':<24}{'error %':>8}")
    for name, err in zip(result["classes"], result["per_class_error"], strict=True):
        print(f"{name:<24}{'-' if err is None else f'{err:.2f}':>8}")


def _trained(result: dict) -> str:
    """ " at iteration 22,800 of 64,000 (unfinished)", or "" where no file says the iteration."""
    iteration, iters = result.get("iteration"), result.get("iters")
    if iteration is None:
        return ""
    if not iters:
        return f" at iteration {iteration:,}"
    unfinished = " (unfinished)" if iteration < iters else ""
    return f" at iteration {iteration:,} of {iters:,}{unfinished}"


def cmd_predict(args: argparse.Namespace) -> None:
    """deepres predict: the most likely classes of each image (--top of them)."""
    for flag, value in (("--batch-size", args.batch_size), ("--top", args.top)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    classifier = load(args.run)
    paths = [p for arg in args.images for p in (image_files(arg) if arg.is_dir() else [arg])]
    # Images are read one by one and classified in batches: one forward per batch, not per image.
    batch: list[tuple[Path, torch.Tensor]] = []
    for path in paths:
        try:
            if not path.exists():  # (a dangling link too)
                raise OSError("no such file")
            if not path.is_file():  # a named pipe would block the read forever
                raise OSError("not a regular file")
            # Pillow's warnings (a decompression bomb's, say) name no file: said again with it.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with Image.open(path) as image:
                    batch.append((path, classifier.to_tensor(image)))
            for warning in caught:
                warnings.warn(f"{path}: {warning.message}", stacklevel=2)
        # Pillow reports a broken file as any of these, a decompression bomb included.
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            _print_predictions(classifier, batch, args)  # the files read before it still count
            raise DataError(f"{path}: not an image deepres can read ({err})") from None
        if len(batch) == args.batch_size:
            _print_predictions(classifier, batch, args)
            batch = []
    _print_predictions(classifier, batch, args)


def _print_predictions(classifier, batch: list, args: argparse.Namespace) -> None:
    """One line per image of the batch: `path: class p, ...`, or with --json a JSON object."""
    if not batch:
        return
    tops = classifier.topk_batch(torch.cat([tensor for _, tensor in batch]), args.top)
    for (path, _), top in zip(batch, tops, strict=True):
        if args.json:
            classes = [{"class": name, "probability": round(p, 6)} for name, p in top]
            print(json.dumps({"image": str(path), "top": classes}))
        else:
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))


def cmd_export(args: argparse.Namespace) -> None:
    """deepres export: a run as ONNX, preprocessing included."""
    print(f"{args.run}: exported to {export_onnx(args.run, args.onnx)}")


def cmd_reproduce(args: argparse.Namespace) -> None:
    """deepres reproduce: one of the paper's experiments, report and figure."""
    models = args.models.split(",") if args.models else None
    command = args.command_line
    result = reproduce(
        args.experiment,
        args.data,
        args.budget,
        args.out,
        args.runs,
        models,
        args.val_split,
        args.device,
        progress=not args.quiet,
        command=command,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
    )
    out = args.out or f"reports/{args.experiment}-{args.budget}"
    for claim in result["claims"]:
        print(f"{claim['claim']}: {claim['verdict']}, {claim['evidence']}")
    print(f"report: {Path(out) / 'report.md'}")


def cmd_publish(args: argparse.Namespace) -> None:
    """deepres publish: ship a finished run's net by name."""
    entry = publish(
        args.run,
        args.name,
        args.command_that_trained,
        bf16=args.bf16 or None,
        record=args.record,
        once=args.once,
    )
    print(json.dumps(entry, indent=2))


def cmd_restore(args: argparse.Namespace) -> None:
    """deepres restore: a shipped net's finished run rebuilt from its training record."""
    print(f"{args.out}: the finished run of {restore(args.record, args.out, args.name)}")


def cmd_pretrained(args: argparse.Namespace) -> None:
    """deepres pretrained: the shipped nets."""
    print("\n".join(describe()) or "no shipped nets")


def cmd_status(args: argparse.Namespace) -> int:
    """deepres status: where each run below the folders stands (exit 2 if one is damaged)."""
    missing = next((p for p in args.paths if not Path(p).exists()), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing}: no such file or directory")
    runs = find_runs(args.paths)
    if not runs:
        where = ", ".join(map(str, args.paths))
        raise ValueError(f"{where}: no run directory (config.json, metrics.jsonl) here")
    rows, broken = [], []
    for run in runs:
        # One damaged run is named, and the others are still listed.
        try:
            rows.append(run_status(run))
        except (ValueError, OSError) as err:  # most name the file already
            named = str(err).startswith(str(run))
            broken.append(str(err) if named else f"{run}: a damaged run file ({err})")
        except (KeyError, TypeError, AttributeError, ZeroDivisionError, OverflowError) as err:
            broken.append(f"{run}: a damaged run file ({type(err).__name__}: {err})")
    if broken and not rows:
        raise ValueError("; ".join(broken))
    for line in broken:
        print(f"deepres status: error: {line}", file=sys.stderr)
    figure = plot_status(rows, args.plot) if args.plot else None
    if args.json:
        print(json.dumps(rows, indent=2))
        if figure:
            print(f"figure: {figure}", file=sys.stderr)  # stdout stays JSON
    else:
        _print_status(rows, figure)
        if args.blocks:
            _print_blocks(rows)
    return 2 if broken else 0


def _print_blocks(rows: list[dict]) -> None:
    """Training error % block by block, the runs side by side: runs compared at equal iterations."""
    names, table = block_table(rows)
    width = max(10, *map(len, names)) + 2
    print()
    print(f"{'iterations':<16}" + "".join(f"{name:>{width}}" for name in names))
    for (first, last), errors in table:
        cells = ("-" if e is None else f"{e:.2f}" for e in errors)
        print(f"{f'{first:,}-{last:,}':<16}" + "".join(f"{c:>{width}}" for c in cells))


def _print_status(rows: list[dict], figure: Path | None) -> None:
    """The status table, one run a line."""
    head = ("iteration", "train err %", "lr", "prec", "hours", "images/s", "left h")
    print(
        f"{'run':<48}{head[0]:>18}{head[1]:>13}{head[2]:>8}{head[3]:>6}{head[4]:>8}{head[5]:>10}"
        f"{head[6]:>8}"
    )
    for r in rows:
        done = f"{r['iteration']:,}/{r['iters']:,}"
        err = "-" if r["train_error"] is None else f"{r['train_error']:.2f}"
        lr = "-" if r["lr"] is None else f"{r['lr']:.3g}"
        speed = "-" if r["images_per_sec"] is None else f"{r['images_per_sec']:.0f}"
        left = "-" if r["hours_left"] is None else f"{r['hours_left']:.1f}"
        left = "done" if r["finished"] else left
        prec = r.get("precision") or "-"
        print(
            f"{r['run']:<48}{done:>18}{err:>13}{lr:>8}{prec:>6}{r['hours']:>8.2f}{speed:>10}"
            f"{left:>8}"
        )
    if figure:
        print(f"figure: {figure}")


def _print_bench(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    if args.save:
        print(f"deepres bench: saved to {save_result(result, args.results_dir)}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))


def cmd_bench_train(args: argparse.Namespace) -> None:
    """deepres bench train: deepres's training against the reference."""
    config = TrainBench(
        model=args.model,
        data=args.data,
        iters=args.iters,
        epochs=args.epochs,
        windows=args.windows,
        device=args.device,
        batch_size=args.batch_size,
        width=args.width,
        val_split=args.val_split,
        workers=args.workers,
        compile=args.compile,
        precision=args.precision,
    )
    r = run_train_benchmark(config, args.command_line)
    lines = [
        f"{r['model']} training, batch {r['batch_size']}, {r['iters']} iterations on {r['device']}",
        f"{'':<10}{'images/s':>10}{'seconds':>10}{'val error %':>13}",
    ]
    for side in ("deepres", "reference"):
        error = r.get(f"{side}_val_error")
        lines.append(
            f"{side:<10}{r[f'{side}_images_per_sec']:>10.1f}{r[f'{side}_seconds']:>10.1f}"
            f"{'-' if error is None else f'{error:.2f}':>13}"
        )
    lines.append(f"ratio {r['ratio']:.2f}x images/s, {r['time_ratio']:.2f}x wall time")
    _print_bench(args, r, lines)


def cmd_bench_infer(args: argparse.Namespace) -> None:
    """deepres bench infer: deepres's inference against the reference."""
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {args.batch_sizes}: expected sizes of 1 or more, as 32,1")
    r = run_infer_benchmark(
        args.model, sizes, args.iters, args.device, args.image_size, args.command_line
    )
    lines = [
        f"{r['model']} inference at {r['image_size']}x{r['image_size']} on {r['device']}",
        f"{'batch':<8}{'deepres':>12}{'reference':>12}{'ratio':>8}  (images/s)",
    ]
    for b, row in r["batch_sizes"].items():
        lines.append(
            f"{b:<8}{row['deepres_images_per_sec']:>12.1f}"
            f"{row['reference_images_per_sec']:>12.1f}{row['ratio']:>7.2f}x"
        )
    _print_bench(args, r, lines)


def cmd_bench_data(args: argparse.Namespace) -> None:
    """deepres bench data: the streaming photo loader against the reference."""
    config = DataBench(
        data=args.data,
        batches=args.batches,
        windows=args.windows,
        batch_size=args.batch_size,
        workers=args.workers,
        augment=args.augment,
        crop=args.crop_size,
        model=args.model,
        train_steps=args.train_steps,
        train_batch_size=args.train_batch_size,
        device=args.device,
    )
    r = run_data_benchmark(config, args.command_line)
    lines = [
        f"photos at {r['crop']}x{r['crop']} ({r['augment']}), batch {r['batch_size']},"
        f" {r['workers']} workers, on {r['device']}",
        f"deepres streaming loader     {r['deepres_images_per_sec']:>8.1f} images/s",
        f"  without JPEG draft mode    {r['deepres_no_draft_images_per_sec']:>8.1f} images/s",
        f"reference PIL pipeline       {r['reference_images_per_sec']:>8.1f} images/s",
        f"{r['train_model']} training steps    {r['train_images_per_sec']:>8.1f} images/s"
        f" (batch {r['train_batch_size']})",
        f"ratio {r['ratio']:.2f}x the reference; the loader"
        f" {'keeps' if r['keeps_up'] else 'does not keep'} up with {r['train_model']}",
    ]
    _print_bench(args, r, lines)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `deepres train`."""
    p.add_argument("--model", help="a name from `deepres models`, e.g. resnet20")
    p.add_argument(
        "--data",
        help="fashion-mnist or mnist, or a path: CIFAR (folder or .tar.gz), IDX files, or an "
        "image folder (folder or .zip)",
    )
    p.add_argument("--out", help="the run directory to create")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a stopped run")
    p.add_argument(
        "--recipe", help="cifar, cifar-warmup or imagenet (default: the paper's for the net)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--iters",
        type=int,
        help="iterations, milestones scaled with them (default: the recipe's full budget: "
        "64,000 for CIFAR's, hours on a CPU; ImageNet's 90 epochs of the data given; "
        "`make demo` uses 2000)",
    )
    budget.add_argument(
        "--epochs", type=float, help="epochs of the data given, turned into iterations"
    )
    p.add_argument("--batch-size", type=int, help="default: the recipe's (CIFAR 128, ImageNet 256)")
    p.add_argument(
        "--lr", type=float, help="default: the recipe's; with --resume: the new lr from then on"
    )
    p.add_argument(
        "--val-split",
        type=int,
        default=0,
        metavar="N",
        help="hold out N training images for validation (default 0: the test split, if any, "
        "is scored; the paper: 5000)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="weights, data order and augmentation (default 0)"
    )
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="default 1000 iterations")
    p.add_argument(
        "--eval-every",
        type=int,
        metavar="K",
        help="test/val error every K iterations, rounded up to whole log windows "
        "(default: 1/40 of the budget)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels, no cuDNN autotuning: repeatable, slower",
    )
    p.add_argument("--device", help="auto (the default), cpu or cuda")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16 autocast where the device has native bf16, else fp32",
    )
    p.add_argument(
        "--shortcut",
        choices=["A", "B", "C"],
        help="Sec. 3.3: A zero-padding (CIFAR default), B projections where the shape changes "
        "(ImageNet default, as torchvision's; Table 2 compares plain and residual nets with "
        "A), C projections everywhere (Sec. 4.1, Table 3)",
    )
    p.add_argument(
        "--stride-in",
        choices=["1x1", "3x3"],
        help="bottleneck stride: 1x1 = v1, the paper's (default); 3x3 = v1.5, torchvision's",
    )
    p.add_argument("--width", type=int, help="filters of the first stage")
    p.add_argument(
        "--normalize",
        choices=["pixel", "channel"],
        help="subtract the per-pixel mean image (CIFAR, Sec. 4.2), or subtract the "
        "per-channel mean and divide by the per-channel std",
    )
    p.add_argument("--image-size", type=int, help="resize image folders to this square size")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the training step (also on --resume: how it runs, not what it learns)",
    )
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="on one GPU without --compile, replay each step as a CUDA graph (default: on; also "
        "on --resume)",
    )
    p.add_argument(
        "--init",
        metavar="WEIGHTS",
        help="start from a run, a shipped net (deepres pretrained), a .safetensors or .pth "
        "state dict: every weight but the fc",
    )
    p.add_argument("--freeze-backbone", action="store_true", help="with --init: train the fc alone")
    photos = p.add_argument_group(
        "photos", "an ImageNet net (resnet18 ...) on an image folder or tar shards streams them"
    )
    photos.add_argument(
        "--augment",
        choices=["scale", "rrc"],
        default="scale",
        help="scale: the paper's shorter side in [256, 480] and a random crop; rrc: "
        "RandomResizedCrop",
    )
    photos.add_argument("--crop-size", type=int, default=224, help="training crop (default 224)")
    photos.add_argument(
        "--scale",
        type=_sizes,
        metavar="LOW,HIGH",
        help="shorter-side range (default 256,480 scaled with --crop-size)",
    )
    photos.add_argument(
        "--lighting", type=float, default=0.1, help="PCA lighting std (AlexNet's 0.1; 0: off)"
    )
    photos.add_argument("--workers", type=int, help="DataLoader workers (default: CPU cores, <= 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage is for --help, not for a mistyped flag."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="deepres", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the nets with depth, params and MACs")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every net")
    p.add_argument(
        "--shortcut", choices=["A", "B", "C"], help="count the nets with this shortcut option"
    )
    p.add_argument("--stride-in", choices=["1x1", "3x3"], help="bottleneck stride: 1x1 = v1")
    p.add_argument("--json", action="store_true", help="one JSON list of the nets")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a net with the paper's recipe")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 error of a trained run")
    p.add_argument("run", type=Path, help="a run directory or a shipped net's name")
    p.add_argument(
        "--data", help="default: the data the run was trained on; a bare <class>/ folder is tested"
    )
    p.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="test (the default): the data's test split; val: the images the run held out "
        "with --val-split",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="single",
        help="single: the training view (photo runs: center); others: full-size images",
    )
    p.add_argument("--resize", type=int, help="center/10crop shorter side (ImageNet nets: 256)")
    p.add_argument("--crop", type=int, help="center/10crop view size (ImageNet nets: 224)")
    p.add_argument("--scales", metavar="S,S", help="multiscale shorter sides (224,256,384,480,640)")
    p.add_argument("--device", default="cpu", help="cpu (the default), auto or cuda")
    p.add_argument("--json", action="store_true", help="one JSON object: errors, n, iteration")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="run one of the paper's experiments, write a report")
    p.add_argument(
        "experiment",
        choices=list(EXPERIMENTS),
        help="degradation: plain against residual nets (Fig. 6); responses: std of layer "
        "responses (Fig. 7); table6: CIFAR-10 errors (Table 6); shortcuts: options A, B, C "
        "(Table 3's question)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="fashion-mnist or mnist, or a path: CIFAR (folder or .tar.gz), IDX files, or an "
        "image folder (folder or .zip)",
    )
    p.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="short",
        help="smoke: 4 iterations, a first look; short: 2,000 (default); full: the paper's 64k",
    )
    p.add_argument("--out", help="report directory (default reports/EXPERIMENT-BUDGET)")
    p.add_argument(
        "--runs",
        help="where the training runs live, reused when present "
        "(default runs/reproduce-DATA-BUDGET)",
    )
    p.add_argument("--models", help="comma-separated nets, e.g. plain20,plain56,resnet20")
    p.add_argument(
        "--val-split",
        type=int,
        help="default: 5000 (at most a tenth of the images) when the data has no test split",
    )
    p.add_argument("--device", default="auto", help="auto (the default), cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile each run's training step")
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        help="on one GPU, launch each step kernel by kernel instead of replaying a CUDA graph",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("predict", help="top-5 classes of images")
    p.add_argument("run", type=Path, help="a run directory or a shipped net's name")
    p.add_argument("images", nargs="+", type=Path, help="images, or folders of them")
    p.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per forward pass (default 64)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("pretrained", help="the trained nets shipped with deepres, by name")
    p.set_defaults(func=cmd_pretrained)

    p = sub.add_parser("status", help="where the runs in a folder stand: iteration, error, time")
    p.add_argument("paths", nargs="*", type=Path, default=[Path("runs")], help="default: runs")
    p.add_argument("--json", action="store_true", help="one JSON list of the runs")
    p.add_argument(
        "--plot",
        type=_file_to_write,
        metavar="PNG",
        help="also draw their error curves in one figure",
    )
    p.add_argument(
        "--blocks",
        action="store_true",
        help="also their training error over each 1/64 of the budget, one column a run "
        "(with --json: each run's train_error_by_block)",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("publish", help="ship a finished run's net under a name (maintainers)")
    p.add_argument("run", type=Path, help="a finished run directory")
    p.add_argument("name", help="e.g. resnet20-cifar10")
    p.add_argument(
        "--command", dest="command_that_trained", required=True, help="how the run was trained"
    )
    p.add_argument("--bf16", action="store_true", help="store the weights in bf16")
    p.add_argument(
        "--record",
        type=Path,
        metavar="DIR",
        help="also write the run's config, metrics and summary here (the folder is replaced), "
        "for `deepres restore`",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="leave a run shipped already as it is; a name another run holds gets the run's "
        "precision (NAME-bf16)",
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "restore", help="rebuild a shipped net's finished run from its record (maintainers)"
    )
    p.add_argument(
        "--record", type=Path, required=True, metavar="DIR", help="where publish --record wrote"
    )
    p.add_argument("--out", type=Path, required=True, help="the run directory to create")
    p.add_argument(
        "--name", help="the shipped net, e.g. resnet56-cifar10 (default: the one the record fits)"
    )
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("export", help="a trained run as ONNX, preprocessing and softmax included")
    p.add_argument("run", type=Path, help="a run directory or a shipped net's name")
    p.add_argument(
        "--onnx", type=_file_to_write, required=True, metavar="FILE", help="e.g. model.onnx"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="time deepres against the plain-PyTorch reference")
    bench = p.add_subparsers(dest="bench_command", required=True)
    save = argparse.ArgumentParser(add_help=False)
    save.add_argument("--device", default="cpu", help="cpu or cuda")
    save.add_argument("--json", action="store_true", help="print the result as JSON")
    save.add_argument("--save", action="store_true", help="add the result to --results-dir")
    save.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        metavar="DIR",
        help="where --save writes (default: benchmarks/results/)",
    )

    p = bench.add_parser("train", parents=[save], help="training images/s, deepres and reference")
    p.add_argument("--model", default="resnet20", help="a CIFAR ResNet")
    p.add_argument("--data", required=True, help="an image folder or .zip of train/<class>/*")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=int, default=60, help="training steps, each side")
    budget.add_argument("--epochs", type=float, help="instead of --iters")
    p.add_argument("--windows", type=int, default=6, help="timing windows; the first is warm-up")
    p.add_argument("--batch-size", type=int, default=128, help="both sides (default 128)")
    p.add_argument("--width", type=int, help="filters of the first stage")
    p.add_argument(
        "--val-split",
        type=int,
        default=0,
        metavar="N",
        help="hold out deepres's N validation images on both sides and score them at the end",
    )
    p.add_argument("--workers", type=int, default=2, help="the reference's DataLoader workers")
    p.add_argument("--compile", action="store_true", help="deepres trains with --compile")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="deepres's precision (the reference stays fp32)",
    )
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("infer", parents=[save], help="inference images/s, deepres and reference")
    p.add_argument("--model", default="resnet50", help="a net from `deepres models`")
    p.add_argument("--batch-sizes", default="32,1", metavar="B,B", help="each timed in turn")
    p.add_argument("--iters", type=int, default=10, help="timed passes per batch size")
    p.add_argument("--image-size", type=int, default=224, help="square input side")
    p.set_defaults(func=cmd_bench_infer)

    p = bench.add_parser(
        "data", parents=[save], help="streaming photo loader against a per-image PIL pipeline"
    )
    p.add_argument("--data", required=True, help="an image folder or .zip of photos")
    p.add_argument("--batches", type=int, default=16, help="batches each loader delivers")
    p.add_argument("--windows", type=int, default=4, help="timing windows; the first is warm-up")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch, both sides")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    p.add_argument(
        "--augment", choices=["scale", "rrc"], default="scale", help="as deepres train's"
    )
    p.add_argument("--crop-size", type=int, default=224, help="as deepres train's")
    p.add_argument("--model", default="resnet18", help="the net whose training is timed")
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps of --model")
    p.add_argument("--train-batch-size", type=int, default=8, help="batch of those steps")
    p.set_defaults(func=cmd_bench_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepres` console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["deepres", *argv])

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"deepres {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = one_line
            # A command returns an exit status when a part of its work failed (status), else None.
            code = args.func(args) or 0
            # A reader gone before a buffered stdout was written out is caught here, not when
            # the interpreter exits.
            sys.stdout.flush()
    except BrokenPipeError:
        # stdout's reader went away (`deepres predict RUN DIR | head`): stop quietly, as cat does,
        # and keep the interpreter's last flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError, FloatingPointError) as err:
        print(f"deepres {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        # Sizes that pass every check and still ask for more memory than there is (--width
        # 100000): torch's allocator says so in a RuntimeError of many lines.
        text = str(err)
        if worker_died(err):
            # Reported mid-step or under torchrun: the run's last regular checkpoint stands.
            cause = text.splitlines()[0].strip()
            hint = "out of memory? fewer --workers use less; --resume from the last checkpoint"
            print(f"deepres {args.command}: error: {cause} ({hint})", file=sys.stderr)
            return 2
        if not isinstance(err, MemoryError) and "memory" not in text:
            raise
        cause = next((line for line in text.splitlines() if "memory" in line), text)
        print(f"deepres {args.command}: error: out of memory ({cause.strip()})", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"deepres {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
