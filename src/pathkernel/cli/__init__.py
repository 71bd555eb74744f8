"""Command line: ``pathkernel demo | bench | info | path-kernel | describe``."""

from __future__ import annotations

import argparse
import json
import re
import sys


def _quadrature(s: str):
    return s if s in ("left", "trapezoid") else int(s)


def _debug_flag(p, default) -> None:
    p.add_argument(
        "--debug", action="store_true", default=default, help="show the traceback of an error"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pathkernel", description=__doc__)
    _debug_flag(ap, False)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="explain a digits classifier by its kernel machine")
    d.add_argument("--out", default="pathkernel-demo", help="folder for the PNGs")
    d.add_argument("--steps", type=int, default=300, help="SGD steps to record")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--quadrature",
        type=_quadrature,
        default=4,
        help="Gauss-Legendre nodes per step, 'left' or 'trapezoid'",
    )
    d.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("bench", help="reference workloads against peers, as ratios")
    b.add_argument("--quick", action="store_true", help="about one minute")
    b.add_argument("--only", nargs="*", help="workload names")
    sub.add_parser("info", help="what the native core was built with")
    from .jobs import add_parsers, run

    add_parsers(sub)
    for p in sub.choices.values():  # after the command too, without resetting it
        _debug_flag(p, argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        return _dispatch(ap, args, run)
    except _USER_ERRORS as e:
        if args.debug:
            raise
        text = _as_flags(" ".join(str(e).split()) or type(e).__name__)
        print(
            f"pathkernel {args.cmd}: error: {text} (--debug shows the traceback)", file=sys.stderr
        )
        return 2


# what a user's arguments, files, model or machine can cause; anything else is a bug and
# keeps its traceback
_USER_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ImportError)


# the library names its arguments; say the flag that set them
_FLAGS = {
    "memory_budget": "--memory-budget",
    "outputs": "--outputs",
    "checkpoints": "--checkpoints",
    "train": "--train",
    "query": "--query",
    "x": "--input",
    "targets": "--targets",
    "project": "--project",
    "seed": "--seed",
    "dtype": "--dtype",
    "out": "--out",
}


def _as_flags(text: str) -> str:
    name = re.match(r"[A-Za-z_]+", text)
    if name and name.group() in _FLAGS and text[name.end() : name.end() + 1] in (":", "[", " "):
        return _FLAGS[name.group()] + text[name.end() :]
    return text


def _dispatch(ap, args, run) -> int:
    if args.cmd in ("path-kernel", "describe"):
        return run(args)

    if args.cmd == "demo":
        from .demo import format_report, run_demo

        if args.steps < 1:
            ap.error("--steps must be positive")
        s = run_demo(
            out=args.out,
            steps=args.steps,
            seed=args.seed,
            quadrature=args.quadrature,
            progress=not args.no_progress,
        )
        print(format_report(s))
        return 0
    if args.cmd == "bench":
        from ..bench.suite import run_bench

        print(run_bench(quick=args.quick, only=args.only))
        return 0
    from .._backend import info

    print(json.dumps(info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
