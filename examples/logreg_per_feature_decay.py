"""Tune one L2 weight decay per feature of a logistic regression by implicit hypergradients.

    python examples/logreg_per_feature_decay.py

Inner problem:  w*(λ) = argmin_w  mean CE_train(w) + ½ Σ_j exp(λ_j) w_j²
Outer problem:  min_λ  mean CE_val(w*(λ))
The hypergradient dCE_val/dλ comes from bl.implicit_hypergrad (implicit function
theorem + conjugate gradient on Hessian-vector products). `python -m bilevel demo --task logreg`
is the full version (baseline, progress bar, plot). Needs scikit-learn.
"""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn: no download
from sklearn.model_selection import train_test_split

import bilevel as bl

torch.set_num_threads(1)  # tiny problem: threads only add overhead
X, y = load_breast_cancer(return_X_y=True)
X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, train_size=100, stratify=y, random_state=0)
X_va, X_te, y_va, y_te = train_test_split(X_rest, y_rest, train_size=235, stratify=y_rest, random_state=1)
mean, std = X_tr.mean(0), X_tr.std(0)  # standardize with the *train* statistics only
Xtr, Xva, Xte = (torch.tensor((a - mean) / std) for a in (X_tr, X_va, X_te))  # float64
ytr, yva, yte = (torch.tensor(a, dtype=torch.float64) for a in (y_tr, y_va, y_te))


def ce(params, X, y):  # mean binary cross-entropy of logistic regression
    return F.binary_cross_entropy_with_logits(X @ params["w"] + params["b"], y)


def inner_loss(params, hparams, X, y):  # training loss: CE + per-feature L2 (bias not decayed)
    return ce(params, X, y) + 0.5 * (hparams["log_decay"].exp() * params["w"] ** 2).sum()


def outer_loss(params, hparams, X, y):  # validation loss
    return ce(params, X, y)


def fit(params, hparams):  # solve the inner problem to high accuracy, warm-started from `params`
    w = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.LBFGS(list(w.values()), max_iter=500, tolerance_grad=1e-10, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner_loss(w, hparams, Xtr, ytr)
        loss.backward()
        return loss

    opt.step(closure)
    return {k: v.detach() for k, v in w.items()}


# Start every decay at 1e-2; log-decays keep the decays positive whatever Adam does.
hparams = {"log_decay": torch.full((30,), -4.6, dtype=torch.float64, requires_grad=True)}
params = {"w": torch.zeros(30, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
outer_opt = torch.optim.Adam(hparams.values(), lr=0.05)
for step in range(40):
    params = fit(params, {k: v.detach() for k, v in hparams.items()})
    hg = bl.implicit_hypergrad(inner_loss, outer_loss, params, hparams, solver=bl.CG(maxiter=31),
                               inner_args=(Xtr, ytr), outer_args=(Xva, yva))
    outer_opt.zero_grad()
    hparams["log_decay"].grad = hg["log_decay"]  # dCE_val / dλ
    outer_opt.step()
    if step % 10 == 0:  # the IFT is only as good as the inner solve: watch the inner gradient norm
        print(f"step {step:2d}  val CE {hg.info.outer_loss:.4f}  inner |grad| {hg.info.inner_grad_norm:.1e}  "
              f"CG iterations {hg.info.solver.iterations}")

params = fit(params, {k: v.detach() for k, v in hparams.items()})
acc = ((Xte @ params["w"] + params["b"] > 0).double() == yte).double().mean()
print(f"final: val CE {float(ce(params, Xva, yva)):.4f}, test CE {float(ce(params, Xte, yte)):.4f}, "
      f"test accuracy {float(acc):.1%}")
print("learned decays:", [f"{d:.1e}" for d in hparams["log_decay"].detach().exp().tolist()])
