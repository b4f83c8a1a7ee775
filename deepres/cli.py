"""The `deepres` command line: parses arguments, calls the library, turns errors into one line."""

from __future__ import annotations

import argparse
import json
import sys

from deepres.models import create_model, list_models, model_family, model_stats


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
