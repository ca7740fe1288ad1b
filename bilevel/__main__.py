"""Command line: ``python -m bilevel demo`` (also the ``bilevel`` console script).

The work lives in the subpackage :mod:`bilevel.demo` (its :func:`~bilevel.demo.main` runs the
command, its tasks, data and report live in submodules); this module only parses arguments.
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
    from .demo import DATASETS, SOLVERS, TASKS

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
        help="tune one weight decay per weight (166,400 of them) of an MLP on bundled data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Tune one L2 weight decay per weight by hypergradient, on a dataset bundled with scikit-learn\n"
            "(no download), and compare with the best single decay of a grid. Prints a table, writes PNGs.\n"
            "\n"
            "--task mlp (default): an MLP 64-512-256-10 on digits (300 train / 300 val / 1197 test images)\n"
            "  with 166,400 per-weight decays, tuned DURING training by bl.HyperOptimizer: Adam on the\n"
            "  weights (1000 steps, minibatches of 64), every 10 steps a hyper step with an implicit\n"
            "  hypergradient (Neumann series, 5 Hessian-vector products) and Adam on the log-decays,\n"
            "  log decay_i = g + d_i (a shared global log-decay learned with the per-weight offsets).\n"
            "  The decays start at a fixed 1e-4 (--init-decay): the tuned run replaces a grid search.\n"
            "  Compared with: the same training (same steps, optimizer, minibatches) with one global decay,\n"
            "  each of 9 half-decades 1e-5..1e-1; the table shows the tuned test loss against the grid's\n"
            "  best and the tuned run's time against the whole grid's. --compare-starts runs the tuned run\n"
            "  from 1e-6, 1e-4, 1e-2 and 1e-1 too. About a minute on 2 CPU cores; --quick: seconds.\n"
            "\n"
            "--task logreg: one decay per weight of a logistic regression (--dataset breast_cancer: 30,\n"
            "  digits: 640), inner problem solved by L-BFGS, hypergradient by bl.implicit_hypergrad,\n"
            "  --outer-steps Adam steps on the log-decays."
        ),
        epilog="examples:\n"
               "  python -m bilevel demo                      # the MLP, results in ./demo_out\n"
               "  python -m bilevel demo --quick --out /tmp/d  # a few seconds\n"
               "  python -m bilevel demo --seed 1 --json r.json\n"
               "  python -m bilevel demo --compare-starts      # tuned from 1e-6, 1e-4, 1e-2, 1e-1 vs the grid\n"
               "  python -m bilevel demo --task logreg --dataset digits --solver nystrom",
    )
    demo.add_argument("--task", choices=TASKS, default="mlp",
                      help="mlp: per-weight decays of an MLP tuned during training (default); "
                           "logreg: per-weight decays of a logistic regression, inner problem solved exactly")
    demo.add_argument("--quick", action="store_true", help="a run of a few seconds (used by the tests)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the train/val/test split (and, for mlp, of the initialization and "
                           "minibatch order) (default: %(default)s)")
    demo.add_argument("--out", default="demo_out", metavar="DIR", help="folder for the PNG plots (default: ./%(default)s)")
    demo.add_argument("--json", default=None, metavar="FILE", help="also write all figures as JSON to FILE")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    demo.add_argument("--solver", choices=SOLVERS, default=None,
                      help="linear solver of the implicit hypergradient; mlp: neumann (default) or cg "
                           "(damped, stops at negative curvature); logreg: cg (default), neumann or nystrom")
    demo.add_argument("--lr", type=_positive_float, default=None,
                      help="Adam learning rate on the log-decays (default: 0.05)")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="torch CPU threads during the run (default: 1; see bilevel/demo/settings.py)")
    mlp = demo.add_argument_group("--task mlp options")
    mlp.add_argument("--inner-steps", type=_positive_int, default=None, metavar="N",
                     help="Adam steps on the weights, for every baseline run and the tuned run "
                          "(default: 1000; 300 with --quick)")
    mlp.add_argument("--hyper-every", type=_positive_int, default=None, metavar="K",
                     help="a hyper step every K inner steps (default: 10)")
    mlp.add_argument("--init-decay", type=_positive_float, default=None, metavar="D",
                     help="start every per-weight decay at D (default: 1e-4, fixed, whatever the grid finds)")
    mlp.add_argument("--starts", type=_positive_float, nargs="+", default=None, metavar="D",
                     help="also run the tuned run from each of these global decays, and report each one's "
                          "test loss and wall time against the grid's best test loss and whole time")
    mlp.add_argument("--compare-starts", action="store_true",
                     help="the same as --starts 1e-6 1e-4 1e-2 1e-1")
    lr = demo.add_argument_group("--task logreg options")
    lr.add_argument("--dataset", choices=DATASETS, default=None,
                    help="breast_cancer (default): binary, 30 decays; digits: 10 classes, 640 decays")
    lr.add_argument("--outer-steps", type=_positive_int, default=None,
                    help="Adam steps on the log-decays (default: 40; "
                         "15 (breast_cancer) or 5 (digits) with --quick)")
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
        from .demo import main as demo_main

        return demo_main(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":
    sys.exit(main())
