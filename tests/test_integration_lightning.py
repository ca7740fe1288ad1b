"""bilevel.integrations.lightning.HyperCallback: hyper steps during Trainer.fit.

Oracle: the same run written as a plain bl.HyperOptimizer loop (inner_step on the batch Lightning
stepped on, hyper_step on it and the next validation batch), in float64; and an uninterrupted
Lightning run for the checkpoint resume (bit for bit on CPU)."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel as bl

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs lightning: "
                                                     "pip install 'bilevel[lightning]'")
from bilevel.integrations.lightning import HyperCallback  # noqa: E402

torch.manual_seed(0)
X, Y = torch.randn(48, 3, dtype=torch.float64), torch.randn(48, 1, dtype=torch.float64)
XV, YV = torch.randn(24, 3, dtype=torch.float64), torch.randn(24, 1, dtype=torch.float64)
VAL = [(XV[i:i + 8], YV[i:i + 8]) for i in range(0, 24, 8)]


def inner_fn(net, hp, batch):
    x, y = batch
    return F.mse_loss(net(x), y) + 0.5 * sum((hp[f"wd/{n}"].exp() * p.square()).sum() for n, p in net.named_parameters())


def outer_fn(m, hp, batch):
    return F.mse_loss(m.net(batch[0]), batch[1])


class Reg(pl.LightningModule):
    def __init__(self, unused=False):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        self.hp = {f"wd/{n}": torch.full((), -2.0, dtype=torch.float64, requires_grad=True)
                   for n, _ in self.net.named_parameters()}
        if unused:
            self.hp["unused"] = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)

    def training_step(self, batch, batch_idx):
        loss = inner_fn(self.net, self.hp, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.5)


def method():
    return bl.Implicit(solver=bl.CG(maxiter=4, damping=0.3, on_indefinite="stop"))


def fit(module, cb, epochs=2, accumulate=1, ckpt=None, logger=False, **kw):
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=8), ckpt_path=ckpt)
    return trainer


def callback(module, every=1, **kw):
    return HyperCallback(module.hp, outer_fn, method=method(), val_dataloader=VAL, every_n_steps=every,
                         outer_optimizer=torch.optim.Adam(module.hp.values(), lr=0.05), **kw)


def plain_loop(epochs=2, every=1, accumulate=1):
    """The same run with a HyperOptimizer: one inner step per (accumulated) batch, hyper steps after."""
    module = Reg()
    hp = module.hp
    hopt = bl.HyperOptimizer(module, hp, inner_loss=lambda m, h, b: inner_fn(m.net, h, b), outer_loss=outer_fn,
                             inner_optimizer=torch.optim.SGD(module.net.parameters(), lr=0.1, momentum=0.5),
                             outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05), method=method(),
                             outer_loader=VAL)
    batches = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 48, 8)]
    step = 0
    for _ in range(epochs):
        for j in range(0, len(batches), accumulate):
            group = batches[j:j + accumulate]
            hopt.inner_step((torch.cat([b[0] for b in group]), torch.cat([b[1] for b in group])))
            step += 1
            if step % every == 0:
                hopt.hyper_step(group[-1], hopt.next_outer_batch())
    return module, hopt


@pytest.mark.parametrize("every, accumulate", [(1, 1), (2, 2)])
def test_fit_with_callback_equals_the_hyperoptimizer_loop(every, accumulate):
    module = Reg()
    cb = callback(module, every=every)
    fit(module, cb, accumulate=accumulate)
    ref, hopt = plain_loop(every=every, accumulate=accumulate)
    assert cb.hyperoptimizer.hyper_steps == hopt.hyper_steps == 12 // (every * accumulate) > 0
    for k in ref.hp:
        torch.testing.assert_close(module.hp[k], ref.hp[k], rtol=1e-10, atol=1e-12)
    for a, b in zip(module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert module.hp["wd/0.weight"].item() != -2.0
    assert cb.hyperoptimizer.trajectory.column("inner_step") == list(range(every, 12 // accumulate + 1, every))


def test_resume_from_a_lightning_checkpoint_is_bit_identical(tmp_path):
    straight = Reg()
    fit(straight, callback(straight), epochs=4)
    first = Reg()
    trainer = fit(first, callback(first), epochs=2)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = Reg()                                     # a fresh process would start like this
    cb = callback(resumed)
    fit(resumed, cb, epochs=4, ckpt=str(tmp_path / "mid.ckpt"))
    for k in straight.hp:
        assert torch.equal(straight.hp[k], resumed.hp[k]), k
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert cb.hyperoptimizer.hyper_steps == 24 and len(cb.hyperoptimizer.trajectory) == 24
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "HyperCallback" in k]
    assert state["counters"]["hyper_steps"] == 12 and set(state["hparams"]) == set(straight.hp)


def test_hyperparameter_summaries_reach_the_logger(tmp_path):
    module = Reg()
    logger = pl.loggers.CSVLogger(tmp_path)
    fit(module, callback(module), epochs=1, logger=logger, log_every_n_steps=1)
    import csv

    with open(next(tmp_path.rglob("metrics.csv")), newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("bilevel/wd/0.weight/mean")]
    traj = module.trainer.callbacks[0].hyperoptimizer.trajectory
    assert [float(r["bilevel/wd/0.weight/mean"]) for r in rows] == pytest.approx(
        traj.column("wd/0.weight/mean"), rel=1e-6)
    assert [int(r["step"]) for r in rows] == [s - 1 for s in traj.column("inner_step")]


@pytest.mark.parametrize("case, match", [
    ("unused", r"\['unused'\] reach neither"),
    ("frozen", "require gradients"),
    ("empty_val", "validation loader yielded no batch"),
])
def test_bad_input_is_refused_before_training(case, match):
    module = Reg(unused=case == "unused")
    if case == "frozen":
        module.net.requires_grad_(False)
    before = [p.detach().clone() for p in module.parameters()]
    cb = HyperCallback(module.hp, outer_fn, method=method(), val_dataloader=[] if case == "empty_val" else VAL)
    with pytest.raises(ValueError, match=match):
        fit(module, cb)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_wrong_arguments_and_missing_lightning(monkeypatch):
    module = Reg()
    with pytest.raises(ValueError, match="every_n_steps"):
        HyperCallback(module.hp, outer_fn, every_n_steps=0)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)      # as if not installed
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "bilevel.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'bilevel\[lightning\]'"):
        importlib.import_module("bilevel.integrations.lightning")
