"""Plots of a run: :func:`trajectory` draws a :class:`bilevel.Trajectory`; :func:`diagnostics_panel`
draws the inner gradient norm and solver iterations on an axes of your own figure.

matplotlib is imported when a plot is drawn, never at ``import bilevel``, through its object API
(no pyplot, no global backend change): plotting works in scripts, notebooks and headless CI alike.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence, Union

from .trajectory import Trajectory

__all__ = ["trajectory", "diagnostics_panel"]

#: what the ImportError says when matplotlib is missing
MPL_MISSING = ("bilevel.plot: matplotlib is not installed. Fix: pip install matplotlib "
               "(or pip install 'bilevel[examples]').")


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(MPL_MISSING) from err
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _floats(values: Sequence[Optional[float]]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def diagnostics_panel(ax: Any, steps: Sequence[float], inner_grad_norm: Sequence[float],
                      solver_iterations: Sequence[Optional[float]], *, solver: str = "solver",
                      xlabel: str = "outer step") -> Any:
    """Draw ``‖∇_w L_T‖`` (log scale, left axis) and the solver's iterations (steps, right axis) per hyper step.

    How far the inner problem was from stationary, and how hard the linear solve worked: the two
    numbers that say whether a hypergradient can be trusted (DESIGN.md §4).

    Args:
        ax: a matplotlib ``Axes``.
        steps, inner_grad_norm, solver_iterations: one value per hyper step (``None``/NaN where a
            method has no solver).
        solver: the solver's name, for the right axis' label.
        xlabel: the x axis' label.

    Returns the right (twin) ``Axes``.

    Example:
        >>> from matplotlib.figure import Figure
        >>> ax = Figure().subplots()
        >>> twin = bl.plot.diagnostics_panel(ax, [0, 1, 2], [1e-3, 1e-4, 1e-5], [5, 4, None], solver="CG")
        >>> twin.get_ylabel()
        'CG iterations'
    """
    its = _floats(solver_iterations)
    ax.semilogy(steps, _floats(inner_grad_norm), color="C3", lw=1, label="inner gradient norm")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("‖∇_w L_T‖ at w*", color="C3")
    twin = ax.twinx()
    twin.plot(steps, its, color="C4", lw=1, drawstyle="steps-mid", label=f"{solver} iterations")
    twin.set_ylabel(f"{solver} iterations", color="C4")
    ax.set_title("hypergradient diagnostics")
    ax.grid(alpha=0.3)
    return twin


def _positive(values: Sequence[float]) -> bool:
    return all(v > 0 for v in values if not math.isnan(v))


def trajectory(traj: Trajectory, path: Union[None, str, os.PathLike] = None, *, max_hparams: int = 8,
               title: Optional[str] = None) -> Any:
    """Draw a run's :class:`bilevel.Trajectory`: outer loss, hypergradient norm, diagnostics, hyperparameters.

    Four panels against the hyper step: the outer (validation) loss; ``‖dL_V/dλ‖`` (log scale);
    :func:`diagnostics_panel` (inner gradient norm and solver iterations); and each
    hyperparameter's mean with its min–max band (log scale when all are positive, as decays are).

    Args:
        traj: the trajectory (``hopt.trajectory``).
        path: where to save a PNG (or any format matplotlib knows by the suffix); ``None``: only
            return the figure.
        max_hparams: draw at most this many hyperparameter tensors (the first ones), so a model with
            a decay per tensor stays readable.
        title: the figure's title.

    Returns the matplotlib ``Figure``. Raises ImportError naming the fix when matplotlib is missing.

    Example:
        >>> traj = bl.Trajectory()
        >>> traj.rows = [{"step": i, "inner_step": 10 * i, "outer_loss": 1.0 / (i + 1), "hypergrad_norm": 0.1,
        ...               "inner_grad_norm": 1e-3, "solver_iterations": 5.0, "wd/mean": 0.1, "wd/min": 0.05,
        ...               "wd/max": 0.2} for i in range(4)]
        >>> fig = bl.plot.trajectory(traj)                         # path="run.png" saves it too
        >>> len(fig.axes)                                          # four panels and the solver's twin axis
        5
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"bilevel.plot.trajectory: expected a bl.Trajectory (hopt.trajectory), got "
                        f"{type(traj).__name__}.")
    fig = _figure((15, 3.8))
    ax_loss, ax_hg, ax_diag, ax_hp = fig.subplots(1, 4)
    steps = traj.column("step")
    ax_loss.plot(steps, _floats(traj.column("outer_loss")), color="C0", lw=1.5)
    ax_loss.set_xlabel("hyper step")
    ax_loss.set_ylabel("outer loss L_V")
    ax_loss.set_title("validation loss")
    ax_loss.grid(alpha=0.3)
    hg = _floats(traj.column("hypergrad_norm"))
    if _positive(hg) and any(not math.isnan(v) for v in hg):
        ax_hg.semilogy(steps, hg, color="C1", lw=1)
    else:
        ax_hg.plot(steps, hg, color="C1", lw=1)
    ax_hg.set_xlabel("hyper step")
    ax_hg.set_ylabel("‖dL_V/dλ‖")
    ax_hg.set_title("hypergradient norm")
    ax_hg.grid(alpha=0.3, which="both")
    diagnostics_panel(ax_diag, steps, traj.column("inner_grad_norm"), traj.column("solver_iterations"),
                      xlabel="hyper step")
    keys = traj.hparam_keys()
    log = all(_positive(_floats(traj.column(f"{k}/min"))) for k in keys)
    for i, key in enumerate(keys[:max_hparams]):
        kind = traj.decays.get(key)
        label = f"{key} (decay)" if kind else key
        ax_hp.plot(steps, _floats(traj.column(f"{key}/mean")), color=f"C{i % 10}", lw=1.5, label=label)
        ax_hp.fill_between(steps, _floats(traj.column(f"{key}/min")), _floats(traj.column(f"{key}/max")), color=f"C{i % 10}",
                           alpha=0.2, lw=0)
    if log and keys:
        ax_hp.set_yscale("log")
    ax_hp.set_xlabel("hyper step")
    ax_hp.set_ylabel("value (mean, min–max band)")
    shown = f" (first {max_hparams} of {len(keys)})" if len(keys) > max_hparams else ""
    ax_hp.set_title(f"hyperparameters{shown}")
    if keys:
        ax_hp.legend(fontsize=7)
    ax_hp.grid(alpha=0.3, which="both")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
    return fig
