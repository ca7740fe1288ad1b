"""Command line: ``python -m bilevel demo`` (also the ``bilevel`` console script).

The work lives in :mod:`bilevel._demo`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m bilevel``."""
    from . import __version__
    from ._demo import DATASETS, SOLVERS

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        # `python -m bilevel` runs this file as __main__.py; the console script is `bilevel`.
        prog="python -m bilevel" if script in ("", "__main__.py", "-c") else script,
        description="bilevel: gradient-based bilevel hyperparameter optimization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"bilevel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="tune one L2 decay per weight of a logistic regression by implicit hypergradients",
        description=(
            "Tune one L2 weight decay per weight of a logistic regression on a dataset bundled with "
            "scikit-learn (no download), by Adam on the log-decays with implicit (IFT) hypergradients. "
            "Compares with one global decay chosen by grid search, prints a summary table and writes a PNG."
        ),
    )
    demo.add_argument("--dataset", choices=DATASETS, default="breast_cancer",
                      help="breast_cancer: binary, 30 decays; digits: 10 classes, 640 decays (default: %(default)s)")
    demo.add_argument("--solver", choices=SOLVERS, default="cg",
                      help="linear solver of the hypergradient (default: %(default)s)")
    demo.add_argument("--outer-steps", type=_positive_int, default=None,
                      help="Adam steps on the log-decays (default: 40; "
                           "15 (breast_cancer) or 5 (digits) with --quick)")
    demo.add_argument("--lr", type=_positive_float, default=None, help="Adam learning rate on the log-decays (default: 0.05)")
    demo.add_argument("--quick", action="store_true", help="a run of a few seconds (used by the tests)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split (default: %(default)s)")
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="folder for the PNG plot (default: ./%(default)s)")
    demo.add_argument("--json", default=None, metavar="FILE", help="also write all figures as JSON to FILE")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Optional[Sequence[object]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example:
        >>> main(["demo", "--quick", "--out", "demo_out"])
        0
    """
    args_in = sys.argv[1:] if argv is None else [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(args_in)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        from ._demo import demo_main

        return demo_main(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
