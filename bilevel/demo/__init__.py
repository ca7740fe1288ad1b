"""The main job, ``python -m bilevel demo``: which task runs, and the command's entry point.

Tasks (``--task``):

- ``mlp`` (default, :mod:`bilevel.demo.tasks.mlp`): an MLP 64-512-256-10 on
  scikit-learn's bundled digits with one weight decay per weight (166,400
  hyperparameters) tuned during training by ``bl.HyperOptimizer`` with implicit
  hypergradients, against the best single decay of a grid with the same
  training budget.
- ``logreg`` (:mod:`bilevel.demo.tasks.logreg`): one decay per weight of a logistic
  regression (breast cancer: 30, digits: 640), the inner problem solved to high
  accuracy by L-BFGS and the hypergradient taken by ``bl.implicit_hypergrad``.

Every task's ``run(...)`` returns a JSON-serializable dict with ``baseline`` and
``tuned`` figures (``val_loss``, ``test_loss``, ``test_acc``, ``wall_s``...).

Layout: :mod:`~bilevel.demo.data` (datasets and splits, shared by the tasks),
:mod:`~bilevel.demo.tasks` (one module per task), :mod:`~bilevel.demo.report`
(progress bar, results table, JSON, plots), :mod:`~bilevel.demo.settings`
(errors, config overrides, threads). :mod:`bilevel.__main__` parses the command
line and calls :func:`main`.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

from . import report
from .data import DATASETS
from .report import Progress, format_report
from .settings import DemoError
from .tasks import logreg, mlp

__all__ = ["TASKS", "TASK_SOLVERS", "SOLVERS", "DATASETS", "DemoError", "Progress", "run", "format_report", "main"]

#: the tasks ``--task`` accepts; the first is the default
TASKS = ("mlp", "logreg")
#: solvers each task accepts (``--solver``)
TASK_SOLVERS = {"mlp": mlp.SOLVERS, "logreg": logreg.SOLVERS}
#: every solver some task accepts (the choices of ``--solver``)
SOLVERS = tuple(dict.fromkeys(s for t in TASKS for s in TASK_SOLVERS[t]))


def _module(task: str) -> Any:
    if task not in TASKS:
        raise ValueError(f"bilevel demo: expected task in {TASKS}, got {task!r}.")
    return mlp if task == "mlp" else logreg


def run(config: Any = None, *, task: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """Run a demo task and return its result dict.

    Args:
        config: an :class:`~bilevel.demo.tasks.mlp.MLPConfig` or
            :class:`~bilevel.demo.tasks.logreg.LogRegConfig` (it decides the task), or ``None``.
        task: ``"mlp"`` (default) or ``"logreg"`` when ``config`` is ``None``.
        kwargs: ``out_dir``, ``progress``, ``stream`` and settings of the task's config
            (e.g. ``quick=True``, ``seed=1``).
    """
    if isinstance(config, mlp.MLPConfig):
        task = task or "mlp"
    elif isinstance(config, logreg.LogRegConfig):
        task = task or "logreg"
    elif config is not None:
        raise TypeError(f"bilevel demo run(): expected an MLPConfig or a LogRegConfig, got {type(config).__name__}.")
    task = task or "mlp"
    return _module(task).run(config, **kwargs)


def _settings(args: Any) -> Dict[str, Any]:
    """The task's settings from the parsed command line (options left at None keep the task's defaults)."""
    task = args.task
    if args.solver is not None and args.solver not in TASK_SOLVERS[task]:
        raise DemoError(f"bilevel demo: --solver {args.solver} is not available for --task {task}; "
                        f"expected one of {TASK_SOLVERS[task]}.")
    if task == "mlp":
        if args.dataset not in (None, "digits"):
            raise DemoError(f"bilevel demo: --task mlp runs on digits only, got --dataset {args.dataset}. "
                            f"Fix: drop --dataset, or use --task logreg.")
        if args.outer_steps is not None:
            raise DemoError("bilevel demo: --outer-steps belongs to --task logreg; for --task mlp use "
                            "--inner-steps and --hyper-every.")
        if args.starts and args.compare_starts:
            raise DemoError("bilevel demo: give --starts or --compare-starts, not both (--compare-starts is "
                            "--starts 1e-6 1e-4 1e-2 1e-1).")
        starts = tuple(args.starts) if args.starts else (mlp.COMPARE_STARTS if args.compare_starts else None)
        s = dict(seed=args.seed, quick=args.quick, inner_steps=args.inner_steps, solver=args.solver,
                 outer_lr=args.lr, hyper_every=args.hyper_every, init_decay=args.init_decay, threads=args.threads,
                 starts=starts)
    else:
        for opt, val in (("--inner-steps", args.inner_steps), ("--hyper-every", args.hyper_every),
                         ("--init-decay", args.init_decay), ("--starts", args.starts),
                         ("--compare-starts", args.compare_starts or None)):
            if val is not None:
                raise DemoError(f"bilevel demo: {opt} belongs to --task mlp (the default), not --task logreg.")
        s = dict(seed=args.seed, quick=args.quick, dataset=args.dataset, solver=args.solver,
                 outer_steps=args.outer_steps, outer_lr=args.lr, threads=args.threads)
    return {k: v for k, v in s.items() if v is not None}


def main(args: Any) -> int:
    """Entry point of ``bilevel demo`` given parsed arguments (see :mod:`bilevel.__main__`); returns the exit status.

    The order is chosen so that a failure late in the run loses as little as possible: the
    settings and the output locations (``--out``, ``--json``) are checked before any training
    (exit status 2), and the results table and the JSON file are out before the plots are
    drawn. A plot that cannot be saved is reported on stderr with exit status 1; the JSON file
    then says why under ``plot_skipped``.
    """
    try:
        settings = _settings(args)
        report.prepare_outputs(args.out, args.json)
        result = run(task=args.task, progress=not args.no_progress, **settings)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result), flush=True)      # no plot lines yet: no plot is saved
    if args.json:
        report.write_json(result, args.json)
    status = 0
    try:
        report.add_plots(result, args.out)
    except Exception as err:  # noqa: BLE001 - any failure of matplotlib or the file system; the figures are out
        reason = f"{type(err).__name__}: {err}"
        result["plot_skipped"] = f"saving the plots in {args.out} failed ({reason})"
        kept = "the table above" + (f" and {args.json}" if args.json else "")
        print(f"error: bilevel demo: could not save the plots in {args.out}: {reason}. Every figure is in "
              f"{kept}; fix the folder (or pass another --out) and rerun for the plots.", file=sys.stderr)
        status = 1
    lines = report.plot_lines(result)
    if lines:
        print("\n".join(lines))
    if args.json:
        report.write_json(result, args.json)
    return status
