"""What a run did, hyper step by hyper step: :class:`HyperStepStats` and the :class:`Trajectory` of them.

A :class:`bilevel.HyperOptimizer` appends one row per hyper step to its ``trajectory``: the step's
diagnostics (hypergradient norm, solver iterations and residual, inner gradient norm, outer loss)
and a summary of every hyperparameter (mean, min, max; of the positive decay for the raw tensors of
a :func:`bilevel.hparams.weight_decay` penalty). The rows are plain numbers, so a trajectory
writes itself to CSV, to TensorBoard, into a checkpoint, or to any logger's ``log_dict``;
:func:`bilevel.plot.trajectory` draws it.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from .hparams import POSITIVE, WeightDecay, positive

__all__ = ["HyperStepStats", "Trajectory", "hparam_summary"]

#: the diagnostics of :class:`HyperStepStats` a trajectory keeps, in its column order
#: (no wall time: rows are the same in a resumed run as in an uninterrupted one, bit for bit)
STAT_COLUMNS = ("outer_loss", "hypergrad_norm", "inner_grad_norm", "solver_iterations", "solver_residual",
                "matvecs", "skipped")
#: the summaries kept of every hyperparameter (columns ``f"{key}/{summary}"``)
SUMMARIES = ("mean", "min", "max")


@dataclass
class HyperStepStats:
    """What one hyper step did.

    Attributes:
        hypergrad_norm: ``‖dL_V/dλ‖`` (``nan`` when skipped).
        outer_loss: ``L_V`` at the weights used.
        inner_grad_norm: ``‖∇_w L_T‖`` at the weights used (how far from stationary).
        solver_iterations, solver_residual, matvecs: the linear solve's diagnostics (Implicit).
        skipped: the step changed nothing (``on_error="skip"``); ``error`` says why.
        seconds: wall time of the hyper step.
        method: the method's class name (``"Implicit"``, ``"Unrolled"``, ``"FirstOrder"``...).
        negative_curvature: the linear solve met negative curvature (``info.extra["indefinite"]``).

    Example:
        >>> stats = bl.HyperStepStats(hypergrad_norm=0.5, outer_loss=1.2, inner_grad_norm=1e-3, solver_iterations=7)
        >>> stats.skipped, stats.as_dict()["solver_iterations"], sorted(stats.as_dict())[:3]
        (False, 7, ['error', 'hypergrad_norm', 'inner_grad_norm'])
    """

    hypergrad_norm: float = math.nan
    outer_loss: float = math.nan
    inner_grad_norm: float = math.nan
    solver_iterations: Optional[int] = None
    solver_residual: Optional[float] = None
    matvecs: Optional[int] = None
    skipped: bool = False
    error: Optional[str] = None
    seconds: float = 0.0
    method: str = ""
    negative_curvature: Optional[bool] = None

    def as_dict(self) -> dict[str, Any]:
        """The statistics as a plain ``dict`` (for logging)."""
        return asdict(self)


def _decay_kinds(decays: Union[None, WeightDecay, Mapping[str, str]], fn: str) -> dict[str, str]:
    """``{hparams key: "exp" | "softplus"}`` of the raw tensors that hold decays."""
    if decays is None:
        return {}
    if isinstance(decays, WeightDecay):
        return {key: decays.kind for key in decays.decay_keys}     # (shared offsets and globals: raw)
    if isinstance(decays, Mapping) and all(k in POSITIVE for k in decays.values()):
        return dict(decays)
    raise TypeError(f"{fn}: expected decays None, a bl.hparams.WeightDecay penalty or a mapping "
                    f"{{hparams key: one of {POSITIVE}}}, got {type(decays).__name__}. Fix: pass the penalty "
                    f"that bl.hparams.weight_decay returned.")


def hparam_summary(hparams: Mapping[str, Tensor], decays: Union[None, WeightDecay, Mapping[str, str]] = None
                   ) -> dict[str, float]:
    """Mean, min and max of every hyperparameter: ``{f"{key}/mean": ..., f"{key}/min": ..., f"{key}/max": ...}``.

    The raw tensors of a decay penalty are summarized as the positive decays they stand for
    (``e^raw`` or ``softplus(raw)``), the others as they are. One host transfer for all.

    Args:
        hparams: the hyperparameter tree (any shapes; empty tensors are left out).
        decays: the :class:`bilevel.hparams.WeightDecay` penalty whose keys hold decays, or
            ``{key: "exp" | "softplus"}``; ``None``: every tensor as it is.

    Shapes: ``hparams`` any leaf shapes; returns plain floats.

    Example:
        >>> hp, penalty = bl.hparams.weight_decay({"w": torch.ones(2)}, init=0.5, per="parameter")
        >>> {k: round(v, 3) for k, v in bl.trajectory.hparam_summary(hp, penalty).items()}
        {'weight_decay/w/mean': 0.5, 'weight_decay/w/min': 0.5, 'weight_decay/w/max': 0.5}
    """
    kinds = _decay_kinds(decays, "bilevel.trajectory.hparam_summary")
    keys, rows = [], []
    with torch.no_grad():
        for k, v in hparams.items():
            if v.numel() == 0:
                continue
            x = positive(v.detach(), kinds[k]) if k in kinds else v.detach()
            rows.append(torch.stack([x.mean(), x.min(), x.max()]).to(torch.float64))
            keys.append(k)
    if not rows:
        return {}
    values = torch.stack([r.to(rows[0].device) for r in rows]).cpu().tolist()
    return {f"{k}/{s}": float(x) for k, vals in zip(keys, values) for s, x in zip(SUMMARIES, vals)}


def _number(x: Any) -> Optional[float]:
    """A float, or ``None`` for a missing value (``None`` equals itself after a checkpoint round trip; NaN
    does not)."""
    return None if x is None or math.isnan(x) else float(x)


class Trajectory:
    """One row of plain numbers per hyper step: diagnostics and hyperparameter summaries.

    A :class:`bilevel.HyperOptimizer` fills its ``trajectory`` at every :meth:`~bilevel.HyperOptimizer.hyper_step`
    (skipped steps too, with ``skipped=1`` and no diagnostics); set ``hopt.trajectory = None``
    to keep nothing. Each row has ``step`` (0, 1, ... per hyper step taken or skipped),
    ``inner_step`` (inner steps so far), the diagnostics ``outer_loss``, ``hypergrad_norm``,
    ``inner_grad_norm``, ``solver_iterations``, ``solver_residual``, ``matvecs`` (``None`` where a
    method has none or the step was skipped: an empty CSV cell, NaN in plots), ``skipped`` (0/1),
    and ``f"{key}/mean|min|max"`` for every hyperparameter (:func:`hparam_summary`).

    Args:
        decays: which hyperparameters are raw decays (summarized as positive decays): a
            :class:`bilevel.hparams.WeightDecay` penalty or ``{key: "exp" | "softplus"}``.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> hp, penalty = bl.hparams.weight_decay(model, init=1e-2, per="tensor")
        >>> loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1])
        >>> hopt = bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss, penalty=penalty,
        ...     inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ...     outer_optimizer=torch.optim.Adam(hp.values(), lr=0.1), method=bl.Implicit(solver=bl.CG(maxiter=3)))
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> for _ in range(3):
        ...     _ = hopt.inner_step(batch); _ = hopt.hyper_step(batch, batch)
        >>> traj = hopt.trajectory
        >>> len(traj), traj.column("inner_step"), traj.column("skipped")
        (3, [1, 2, 3], [0, 0, 0])
        >>> [c for c in traj.columns if c.startswith("weight_decay/weight/")]       # decays e^raw, not raw
        ['weight_decay/weight/mean', 'weight_decay/weight/min', 'weight_decay/weight/max']
        >>> import os, tempfile
        >>> traj.to_csv(os.path.join(tempfile.mkdtemp(), "trajectory.csv"))     # and to_tensorboard(log_dir)
    """

    def __init__(self, decays: Union[None, WeightDecay, Mapping[str, str]] = None) -> None:
        #: ``{hparams key: "exp" | "softplus"}``: the keys summarized as positive decays
        self.decays = _decay_kinds(decays, "bilevel.Trajectory")
        #: the rows, oldest first: ``{column: number}``
        self.rows: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, stats: HyperStepStats, hparams: Mapping[str, Tensor], *, inner_step: int) -> dict[str, Any]:
        """Append the row of one hyper step (``stats``, the hyperparameters after it); returns the row."""
        row: dict[str, Any] = {"step": len(self.rows), "inner_step": int(inner_step)}
        for name in STAT_COLUMNS:
            value = getattr(stats, name)
            row[name] = int(value) if name == "skipped" else _number(value)
        row.update(hparam_summary(hparams, self.decays))
        self.rows.append(row)
        return row

    @property
    def columns(self) -> list[str]:
        """Every column name, in the order of first appearance."""
        return list({k: None for row in self.rows for k in row})

    def column(self, name: str) -> list[Any]:
        """The values of one column, one per row (``None`` where a row has no value)."""
        if self.rows and not any(name in r for r in self.rows):
            raise KeyError(f"bilevel.Trajectory.column: no column {name!r}; the columns are {self.columns}.")
        return [r.get(name) for r in self.rows]

    def hparam_keys(self) -> list[str]:
        """The hyperparameter keys summarized (columns ``f"{key}/mean"`` and so on)."""
        return [c[: -len("/mean")] for c in self.columns if c.endswith("/mean")]

    def to_csv(self, path: Union[str, os.PathLike]) -> None:
        """Write the rows as CSV with a header (a missing value is an empty cell, as pandas and spreadsheets read it)."""
        cols = self.columns
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerows(self.rows)

    def to_tensorboard(self, writer: Any, *, prefix: str = "bilevel", start: int = 0) -> bool:
        """Write rows ``start:`` as TensorBoard scalars ``f"{prefix}/{column}"`` at ``global_step=inner_step``.

        Args:
            writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``), or
                a log folder for a new one (closed when done).
            prefix: the tags' group.
            start: the first row to write (call with ``start=len(traj)`` saved from the last call to
                stream a long run).

        Returns ``True``; ``False`` (and a warning) when a folder was given and the ``tensorboard``
        package is not installed, so a run never fails for its logging.
        """
        own = not hasattr(writer, "add_scalar")
        if own:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                import warnings

                warnings.warn("bilevel.Trajectory.to_tensorboard: the tensorboard package is not installed, "
                              "nothing was written. Fix: pip install tensorboard (or write to_csv).",
                              RuntimeWarning, stacklevel=2)
                return False
            writer = SummaryWriter(log_dir=os.fspath(writer))
        for row in self.rows[start:]:
            for name, value in row.items():
                if name not in ("step", "inner_step") and value is not None:
                    writer.add_scalar(f"{prefix}/{name}", value, global_step=row["inner_step"])
        if own:
            writer.close()
        else:
            writer.flush()
        return True

    def state_dict(self) -> dict[str, Any]:
        """The rows and decay kinds (plain Python: loadable with ``torch.load(weights_only=True)``)."""
        return {"decays": dict(self.decays), "rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.decays = dict(state.get("decays", self.decays))
        self.rows = [dict(r) for r in state["rows"]]
