"""Trajectory recording (bilevel/trajectory.py), its CSV/TensorBoard/checkpoint forms, bl.plot, and the
torch.optim habits of HyperOptimizer (zero_grad, param_groups, lr schedulers on both optimizers).

Oracles: the HyperStepStats each hyper step returns, the hyperparameters read back and summarized
independently in float64, the CSV/event files read back by their own readers, and a hand-written
float64 loop (plain autograd, no bilevel) for the schedulers."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_TB = importlib.util.find_spec("tensorboard") is not None


def _run(n_hyper=4, on_error="raise", nan_at=None, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(dtype)
    decays, penalty = bl.hparams.weight_decay(model, init=1e-2, per="parameter", kind="softplus")
    hp = {**decays, "shift": torch.tensor([0.1, -0.2], dtype=dtype, requires_grad=True)}

    def inner(m, h, b):
        x, y = b
        return F.mse_loss(m(x).squeeze(-1) + h["shift"].mean(), y)

    def outer(m, h, b):
        return F.mse_loss(m(b[0]).squeeze(-1), b[1])

    hopt = bl.HyperOptimizer(model, hp, inner_loss=inner, outer_loss=outer, penalty=penalty, on_error=on_error,
                             inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                             method=bl.Implicit(solver=bl.CG(maxiter=3)))
    X, y = torch.randn(16, 3, dtype=dtype), torch.randn(16, dtype=dtype)
    stats, snapshots = [], []
    for t in range(n_hyper):
        hopt.inner_step((X, y))
        batch = (X * math.nan, y) if t == nan_at else (X, y)
        with pytest.warns(RuntimeWarning) if t == nan_at else _nothing():
            stats.append(hopt.hyper_step(batch, (X[:8], y[:8])))
        snapshots.append({k: v.detach().clone() for k, v in hp.items()})
    return hopt, stats, snapshots


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_rows_hold_each_hyper_steps_stats_and_hparam_summaries():
    hopt, stats, snaps = _run()
    traj = hopt.trajectory
    assert len(traj) == 4 and traj.column("step") == [0, 1, 2, 3] and traj.column("inner_step") == [1, 2, 3, 4]
    for row, st, hp in zip(traj.rows, stats, snaps):
        assert row["outer_loss"] == st.outer_loss and row["hypergrad_norm"] == st.hypergrad_norm
        assert row["inner_grad_norm"] == st.inner_grad_norm and row["solver_iterations"] == st.solver_iterations == 3
        assert row["solver_residual"] == st.solver_residual and row["skipped"] == 0
        for key in ("weight_decay/weight", "weight_decay/bias"):      # decays: softplus(raw), not raw
            decay = F.softplus(hp[key].double())
            for s, want in (("mean", decay.mean()), ("min", decay.min()), ("max", decay.max())):
                assert row[f"{key}/{s}"] == pytest.approx(float(want), rel=1e-14)
        assert row["shift/mean"] == pytest.approx(float(hp["shift"].mean()), rel=1e-14)     # others: raw
        assert row["shift/min"] == float(hp["shift"].min()) and row["shift/max"] == float(hp["shift"].max())
    # the decays moved between rows (the recording follows the run, not the start)
    assert traj.column("weight_decay/weight/mean")[0] != traj.column("weight_decay/weight/mean")[-1]
    assert traj.hparam_keys() == ["weight_decay/weight", "weight_decay/bias", "shift"]
    assert traj.decays == {"weight_decay/weight": "softplus", "weight_decay/bias": "softplus"}


def test_a_skipped_hyper_step_is_a_row_with_nan_diagnostics():
    hopt, stats, snaps = _run(on_error="skip", nan_at=2)
    row = hopt.trajectory.rows[2]
    assert stats[2].skipped and row["skipped"] == 1
    assert row["hypergrad_norm"] is None and row["solver_iterations"] is None and row["outer_loss"] is None
    assert row["shift/mean"] == pytest.approx(float(snaps[1]["shift"].mean()), rel=1e-14)   # unchanged


def _tiny():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    hp = {"a": torch.tensor(0.0, requires_grad=True)}
    loss = lambda m, h, b: F.mse_loss(m(b[0]), b[1]) + h["a"].exp() * m.weight.square().sum()
    return model, hp, bl.HyperOptimizer(model, hp, inner_loss=loss, outer_loss=loss,
                                        inner_optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        outer_optimizer=torch.optim.SGD(hp.values(), lr=0.1), method=bl.FirstOrder())


def test_no_trajectory_when_set_to_none():
    _, _, hopt = _tiny()
    hopt.trajectory = None
    b = (torch.randn(4, 2), torch.randn(4, 1))
    hopt.hyper_step(b, b)
    assert hopt.state_dict()["trajectory"] is None


def test_csv_reads_back_the_rows(tmp_path):
    hopt, _, _ = _run(on_error="skip", nan_at=1)
    path = tmp_path / "traj.csv"
    hopt.trajectory.to_csv(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == hopt.trajectory.columns
    assert len(rows) == 4 and rows[1]["hypergrad_norm"] == "" and rows[1]["skipped"] == "1"   # skipped: empty
    for got, want in zip(rows, hopt.trajectory.rows):
        for k, v in want.items():
            assert (got[k] == "" and v is None) or float(got[k]) == v, (k, got[k], v)


def test_checkpoint_keeps_the_trajectory(tmp_path):
    hopt, _, _ = _run()
    hopt.save(tmp_path / "ckpt.pt")
    fresh, _, _ = _run(n_hyper=1)
    fresh.load(tmp_path / "ckpt.pt")               # torch.load(weights_only=True) underneath
    assert fresh.trajectory.rows == hopt.trajectory.rows and "seconds" not in fresh.trajectory.columns


@pytest.mark.skipif(not HAS_TB, reason="writing TensorBoard events needs the tensorboard package")
def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hopt, _, _ = _run()
    assert hopt.trajectory.to_tensorboard(tmp_path / "tb") is True
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("bilevel/outer_loss")
    assert [e.step for e in events] == hopt.trajectory.column("inner_step")
    assert [e.value for e in events] == pytest.approx(hopt.trajectory.column("outer_loss"), rel=1e-6)
    assert "bilevel/weight_decay/bias/max" in acc.Tags()["scalars"]


def test_tensorboard_missing_skips_with_a_warning(tmp_path, monkeypatch):
    hopt, _, _ = _run(n_hyper=1)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)       # as if not installed
    with pytest.warns(RuntimeWarning, match="pip install tensorboard"):
        assert hopt.trajectory.to_tensorboard(tmp_path / "tb") is False
    assert not (tmp_path / "tb").exists()


def test_tensorboard_writer_object_gets_every_scalar():
    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, global_step):
            self.calls.append((tag, value, global_step))

        def flush(self):
            pass

    hopt, _, _ = _run(n_hyper=3)
    w = Writer()
    hopt.trajectory.to_tensorboard(w, prefix="hp", start=1)
    n_cols = len(hopt.trajectory.columns) - 2                   # step and inner_step are the x axis
    assert len(w.calls) == 2 * n_cols and {c[2] for c in w.calls} == {2, 3}
    assert ("hp/outer_loss", hopt.trajectory.rows[1]["outer_loss"], 2) in w.calls


def test_bad_decays_argument_is_refused():
    with pytest.raises(TypeError, match="WeightDecay"):
        bl.Trajectory(decays={"wd": "log"})


@pytest.mark.skipif(not HAS_MPL, reason="plots need matplotlib")
def test_plot_draws_each_column(tmp_path):
    hopt, _, _ = _run()
    traj = hopt.trajectory
    fig = bl.plot.trajectory(traj, tmp_path / "traj.png", title="run")
    assert (tmp_path / "traj.png").stat().st_size > 1000
    ax_loss, ax_hg, ax_diag, ax_hp, twin = fig.axes
    assert list(ax_loss.lines[0].get_ydata()) == traj.column("outer_loss")
    assert list(ax_hg.lines[0].get_ydata()) == traj.column("hypergrad_norm")
    assert list(ax_diag.lines[0].get_ydata()) == traj.column("inner_grad_norm")
    assert list(twin.lines[0].get_ydata()) == traj.column("solver_iterations")
    means = {line.get_label(): list(line.get_ydata()) for line in ax_hp.lines}
    assert means["weight_decay/weight (decay)"] == traj.column("weight_decay/weight/mean")
    assert means["shift"] == traj.column("shift/mean")
    assert ax_hp.get_yscale() == "linear"                       # shift < 0: no log scale
    with pytest.raises(TypeError, match="bl.Trajectory"):
        bl.plot.trajectory(traj.rows)
    skipped, _, _ = _run(on_error="skip", nan_at=1)               # missing values are gaps (NaN)
    hg = bl.plot.trajectory(skipped.trajectory).axes[1].lines[0].get_ydata()
    assert math.isnan(hg[1]) and hg[2] == skipped.trajectory.rows[2]["hypergrad_norm"]


def test_plot_without_matplotlib_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        bl.plot.trajectory(bl.Trajectory())


# -- torch.optim habits -----------------------------------------------------------------------------
def test_zero_grad_clears_hparams_and_inner_grads():
    model, hp, hopt = _tiny()
    for t in [hp["a"], *model.parameters()]:
        t.grad = torch.ones_like(t)
    hopt.zero_grad(set_to_none=False)
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in [hp["a"], *model.parameters()])
    hopt.zero_grad()
    assert all(t.grad is None for t in [hp["a"], *model.parameters()])
    assert hopt.param_groups is hopt.outer_optimizer.param_groups


def test_lr_schedulers_on_both_optimizers_match_a_hand_written_loop():
    """StepLR on the inner optimizer (read by bl.Unrolled's look-ahead step) and CosineAnnealingLR on
    the outer one: the HyperOptimizer run equals plain autograd written out by hand, in float64."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    Xv, yv = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    w0, b0 = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, dtype=torch.float64)
    T = 6

    def inner_fn(w, b, lam, X, y):
        return F.mse_loss(X @ w.T + b, y) + 0.5 * (lam.exp() * w.square()).sum()

    def outer_fn(w, b, X, y):
        return F.mse_loss(X @ w.T + b, y)

    # -- the library
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(w0)
        model.bias.copy_(b0)
    hp = {"lam": torch.full((1, 4), -1.0, dtype=torch.float64, requires_grad=True)}
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.2)
    outer_opt = torch.optim.SGD(hp.values(), lr=0.5, momentum=0.5)
    hopt = bl.HyperOptimizer(model, hp, inner_optimizer=inner_opt, outer_optimizer=outer_opt,
                             inner_loss=lambda m, h, bt: inner_fn(m.weight, m.bias, h["lam"], *bt),
                             outer_loss=lambda m, h, bt: outer_fn(m.weight, m.bias, *bt),
                             method=bl.Unrolled(steps=1))
    s_in = torch.optim.lr_scheduler.StepLR(hopt.inner_optimizer, step_size=2, gamma=0.5)
    s_out = torch.optim.lr_scheduler.CosineAnnealingLR(hopt.outer_optimizer, T_max=T)
    outer_lrs = []
    for _ in range(T):
        hopt.zero_grad()
        hopt.inner_step((X, y))
        hopt.hyper_step((X, y), (Xv, yv))
        outer_lrs.append(hopt.param_groups[0]["lr"])
        s_in.step()
        s_out.step()

    # -- by hand: SGD on the weights, one differentiated look-ahead step, SGD+momentum on lam
    w, b, lam = w0.clone(), b0.clone(), torch.full((1, 4), -1.0, dtype=torch.float64)
    buf = None
    for t in range(T):
        lr_in = 0.2 * 0.5 ** (t // 2)
        lr_out = 0.5 * (1 + math.cos(math.pi * t / T)) / 2
        assert outer_lrs[t] == pytest.approx(lr_out, rel=1e-14)
        w_, b_ = w.requires_grad_(), b.requires_grad_()
        gw, gb = torch.autograd.grad(inner_fn(w_, b_, lam, X, y), (w_, b_))
        w, b = (w_ - lr_in * gw).detach(), (b_ - lr_in * gb).detach()
        w_, b_, lam_ = w.requires_grad_(), b.requires_grad_(), lam.requires_grad_()
        gw, gb = torch.autograd.grad(inner_fn(w_, b_, lam_, X, y), (w_, b_), create_graph=True)
        (hg,) = torch.autograd.grad(outer_fn(w_ - lr_in * gw, b_ - lr_in * gb, Xv, yv), lam_)
        buf = hg if buf is None else 0.5 * buf + hg
        w, b, lam = w.detach(), b.detach(), (lam - lr_out * buf).detach()
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=0)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-12, atol=0)
    torch.testing.assert_close(hp["lam"].detach(), lam, rtol=1e-12, atol=0)
    assert lam[0, 0] != -1.0
