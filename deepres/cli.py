"""The `deepres` command line: parses arguments, calls the library, turns errors into one line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from deepres.data import DataError
from deepres.evaluate import evaluate_run
from deepres.experiments import EXPERIMENTS, reproduce
from deepres.experiments.common import BUDGETS
from deepres.inference import load
from deepres.models import create_model, list_models, model_family, model_stats
from deepres.train import TrainConfig, load_config, train


def _model_options(args: argparse.Namespace, name: str) -> dict:
    options = {}
    if args.shortcut:
        options["shortcut"] = args.shortcut
    if args.stride_in and model_family(name) == "imagenet":
        options["stride_in_1x1"] = args.stride_in == "1x1"
    return options


def cmd_models(args: argparse.Namespace) -> None:
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
    if args.resume:
        config = load_config(args.resume)
        summary = train(config, resume=True, progress=not args.quiet)
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
            checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every,
            deterministic=args.deterministic,
            device=args.device,
            precision=args.precision,
            shortcut=args.shortcut,
            width=args.width,
            normalize=args.normalize,
            image_size=args.image_size,
        )
        summary = train(config, progress=not args.quiet)
    print(json.dumps(summary, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    result = evaluate_run(args.run, args.data, args.split, args.device)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "classes"}, indent=2))
        return
    print(f"{args.run} on {result['data']} ({result['split']}, {result['n']} images)")
    print(f"top-1 error {result['top1_error']:.2f}%   top-5 error {result['top5_error']:.2f}%")
    print(f"{'class':<24}{'error %':>8}")
    for name, err in zip(result["classes"], result["per_class_error"], strict=True):
        print(f"{name:<24}{'-' if err is None else f'{err:.2f}':>8}")


def cmd_predict(args: argparse.Namespace) -> None:
    classifier = load(args.run)
    for path in args.images:
        try:
            with Image.open(path) as image:
                top = classifier.topk(image, args.top)
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not an image deepres can read ({err})") from None
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))


def cmd_reproduce(args: argparse.Namespace) -> None:
    models = args.models.split(",") if args.models else None
    command = "deepres " + " ".join(shlex.quote(a) for a in sys.argv[1:])
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
    )
    out = args.out or f"reports/{args.experiment}-{args.budget}"
    for claim in result["claims"]:
        print(f"{claim['claim']}: {claim['verdict']}, {claim['evidence']}")
    print(f"report: {Path(out) / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="deepres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the nets with depth, params and MACs")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--shortcut", choices=["A", "B", "C"])
    p.add_argument("--stride-in", choices=["1x1", "3x3"], help="bottleneck stride: 1x1 = v1")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a net with the paper's recipe")
    p.add_argument("--model", help="a name from `deepres models`, e.g. resnet20")
    p.add_argument("--data", help="fashion-mnist, or a path: CIFAR, IDX or an image folder")
    p.add_argument("--out", help="the run directory to create")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue a stopped run")
    p.add_argument("--recipe", help="cifar or cifar-warmup (default: the paper's for the net)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iters", type=int, help="iterations (milestones scale with it)")
    budget.add_argument("--epochs", type=float, help="epochs, turned into iterations")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument(
        "--val-split",
        type=int,
        default=0,
        metavar="N",
        help="hold out N training images for validation (the paper: 5000)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000, metavar="K")
    p.add_argument("--eval-every", type=int, metavar="K")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--shortcut", choices=["A", "B", "C"])
    p.add_argument("--width", type=int, help="filters of the first stage")
    p.add_argument("--normalize", choices=["pixel", "channel"])
    p.add_argument("--image-size", type=int, help="resize image folders to this square size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 error of a trained run")
    p.add_argument("run", type=Path)
    p.add_argument("--data", help="default: the data the run was trained on")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("reproduce", help="run one of the paper's experiments, write a report")
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--data", required=True)
    p.add_argument("--budget", choices=list(BUDGETS), default="short")
    p.add_argument("--out", help="report directory (default reports/EXPERIMENT-BUDGET)")
    p.add_argument("--runs", help="where the training runs live (reused when present)")
    p.add_argument("--models", help="comma-separated nets, e.g. plain20,plain56,resnet20")
    p.add_argument("--val-split", type=int, help="default: 5000 when the data has no test split")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("predict", help="top-5 classes of images")
    p.add_argument("run", type=Path)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepres` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"deepres {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepres {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
