"""Tune the learning rate and momentum of SGD by differentiating through training (forward mode).

    python examples/learning_rate.py            # a few seconds
    python examples/learning_rate.py --smoke    # fewer steps (CI)

The hyperparameters here act only through the optimizer, not through the loss, so the implicit
function theorem cannot see them (at a minimum, w* does not depend on the learning rate). We
instead run T steps of a *differentiable* SGD from a fixed initialization and differentiate the
validation loss after them:

    w_{t+1}, m_{t+1} = SGD(lr, momentum).step(w_t, ∇ CE(w_t; batch_t), m_t)      t = 0..T-1
    outer:           min_{lr, momentum}  CE_val(w_T)

with ``bl.unrolled_hypergrad(..., optimizer=bl.inner.SGD(lr="lr", momentum="mom"),
mode="forward", steps=T)``. Forward mode carries the derivative of (w_t, m_t) along two
hyperparameter directions (vmapped jvps): its memory does not grow with T and its cost is ∝ the
number of hyperparameters (2 here), the right trade for a handful of optimizer settings.

Keeping lr > 0 and momentum in (0, 1). The inner optimizer reads ``hparams["lr"]`` and
``hparams["mom"]`` by name and uses them as they are. We optimize unconstrained raw leaves
(``log_lr``, ``logit_mom``) and hand the optimizer the constrained values
``lr = exp(log_lr)``, ``mom = sigmoid(logit_mom)``, recomputed every outer step.
``unrolled_hypergrad`` returns dCE_val/dlr and dCE_val/dmom (it differentiates with respect to the
tensors it is given), and ``torch.autograd.backward`` pushes them through exp and sigmoid into the
raw leaves (the chain rule). Why not a raw ``lr`` and a clamp: a clamp has zero gradient once
active, so an lr pushed to the boundary stays stuck; and in log-space an Adam step changes the lr
by a *factor*, which suits a quantity whose sensible values span decades.

Data: scikit-learn's bundled ``load_digits`` (no download); a small MLP.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

import bilevel as bl


def load_data(seed: int = 0):
    """Digits: 1000 train / 400 val / 397 test, standardized with the train statistics."""
    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm]
    y = torch.tensor(y, dtype=torch.long)[perm]
    mean, std = X[:1000].mean(0), X[:1000].std(0).clamp_min(1e-3)
    X = (X - mean) / std
    return (X[:1000], y[:1000]), (X[1000:1400], y[1000:1400]), (X[1400:], y[1400:])


def main(smoke: bool = False, seed: int = 0, verbose: bool = True) -> dict:
    """Tune (lr, momentum) for T steps of SGD; returns the validation-loss curve and the learned values."""
    say = print if verbose else (lambda *a, **k: None)
    torch.set_num_threads(1)                      # small model: threads only add overhead
    torch.manual_seed(seed)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = load_data(seed)
    T = 30 if smoke else 100                      # inner SGD steps (the training run being tuned)
    outer_steps = 10 if smoke else 40
    batch = 64

    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}   # the same start every time
    # A fixed sequence of minibatches, so that every outer step tunes the *same* training run and
    # the curve below measures the hyperparameters, not minibatch luck.
    g = torch.Generator().manual_seed(seed)
    idx = [torch.randint(0, len(ytr), (batch,), generator=g) for _ in range(T)]
    batches = [(Xtr[i], ytr[i]) for i in idx]

    def inner_loss(params, hparams, x, y):        # the hyperparameters act through the optimizer only
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    def outer_loss(params, hparams, x, y):
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    opt = bl.inner.SGD(lr="lr", momentum="mom")   # reads hparams["lr"], hparams["mom"] by name
    raw = {"log_lr": torch.tensor(math.log(0.01), requires_grad=True),      # start: lr 0.01,
           "logit_mom": torch.tensor(0.0, requires_grad=True)}             #        momentum 0.5
    outer_opt = torch.optim.Adam(raw.values(), lr=0.1)

    def constrained():
        return {"lr": raw["log_lr"].exp(), "mom": torch.sigmoid(raw["logit_mom"])}

    def hypergrad(h, mode="forward"):
        return bl.unrolled_hypergrad(inner_loss, outer_loss, w0, h, optimizer=opt, steps=T, mode=mode,
                                     inner_args=lambda t: batches[t], outer_args=(Xva, yva))

    # Sanity check, once: forward mode and reverse mode give the same hypergradient.
    h = {k: v.detach() for k, v in constrained().items()}
    hf, _ = hypergrad(h, "forward")
    hr, _ = hypergrad(h, "reverse")
    agree = max(abs(float(hf[k] - hr[k])) / max(abs(float(hr[k])), 1e-12) for k in h)
    say(f"forward vs reverse mode at the start: dCE/dlr {float(hf['lr']):+.4f} vs {float(hr['lr']):+.4f}, "
        f"dCE/dmom {float(hf['mom']):+.4f} vs {float(hr['mom']):+.4f} (max relative difference {agree:.1e})")

    curve, lrs, moms = [], [], []
    t0 = time.perf_counter()
    for k in range(outer_steps):
        h = constrained()                          # non-leaf tensors computed from the raw leaves
        lr_now, mom_now = float(h["lr"].detach()), float(h["mom"].detach())
        try:
            hg, wT = hypergrad(h)
        except bl.NonFiniteError:
            # The lr grew past what T steps of SGD survive (NaN/Inf weights). Back off by half and
            # go on; this is the safety valve of learning-rate tuning, not a normal step.
            with torch.no_grad():
                raw["log_lr"] -= math.log(2.0)
            say(f"  outer {k:3d}  training diverged at lr {lr_now:.3g}: halving it")
            continue
        curve.append(hg.info.outer_loss)          # validation CE after T steps at this (lr, mom)
        lrs.append(lr_now)
        moms.append(mom_now)
        outer_opt.zero_grad()
        # chain rule into the raw leaves: d/dlog_lr = lr·dCE/dlr, d/dlogit = mom(1−mom)·dCE/dmom
        torch.autograd.backward([h["lr"], h["mom"]], [hg["lr"], hg["mom"]])
        outer_opt.step()
        if k % (2 if smoke else 5) == 0 or k == outer_steps - 1:
            say(f"  outer {k:3d}  val CE after {T} SGD steps {curve[-1]:.4f}  lr {lrs[-1]:.4f}  "
                f"momentum {moms[-1]:.3f}  dCE/dlr {float(hg['lr']):+.3e}  dCE/dmom {float(hg['mom']):+.3e}")
    seconds = time.perf_counter() - t0

    final = {k: v.detach() for k, v in constrained().items()}
    _, wT = hypergrad(final)
    with torch.no_grad():
        val_final = float(outer_loss(wT, final, Xva, yva))
        acc = lambda w: float((functional_call(model, w, (Xte,)).argmax(1) == yte).float().mean())
    _, w_start = hypergrad({"lr": torch.tensor(0.01), "mom": torch.tensor(0.5)})
    say(f"learned: lr {float(final['lr']):.4f} (start 0.01), momentum {float(final['mom']):.3f} (start 0.5); "
        f"{outer_steps} outer steps in {seconds:.1f} s")
    say(f"validation CE after {T} steps: {curve[0]:.4f} -> {val_final:.4f}; "
        f"test accuracy {acc(w_start):.1%} -> {acc(wT):.1%}")
    return {"val_curve": curve, "val_start": curve[0], "val_final": val_final, "lr": float(final["lr"]),
            "momentum": float(final["mom"]), "lr_history": lrs, "momentum_history": moms,
            "forward_reverse_rel_diff": agree, "test_acc_start": acc(w_start), "test_acc_final": acc(wT),
            "seconds": seconds}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="shorter runs (CI)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    main(smoke=a.smoke, seed=a.seed)
    print(f"total {time.perf_counter() - t:.1f} s")
