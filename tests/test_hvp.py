"""bl.hvp / bl.mixed_vjp / HessianOperator against dense Hessians and finite differences."""

import pytest
import torch
from torch.func import functional_call

import bilevel as bl
from bilevel._tree import Flat

from conftest import cube_fn, rel_err, tree_rel_err

DT = torch.float64


def _mlp():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DT)
    params = {k: v.detach() for k, v in net.named_parameters()}
    X = torch.randn(7, 3, dtype=DT)
    y = torch.randint(0, 2, (7,))

    def loss(p, X, y):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y)

    return net, params, X, y, loss


def _dense_hessian(loss, params, *args):
    fl = Flat(params)
    w0 = fl.flatten(params)
    return torch.autograd.functional.hessian(lambda w: loss(fl.unflatten(w), *args), w0)


def _fd_hvp(loss, params, v, *args, eps=1e-6):
    """Central finite differences of the gradient: (g(w+εv) − g(w−εv)) / 2ε."""
    fl = Flat(params)
    w0, vv = fl.flatten(params), fl.flatten(v)

    def g(w):
        w = w.clone().requires_grad_(True)
        return torch.autograd.grad(loss(fl.unflatten(w), *args), w)[0]

    return fl.unflatten((g(w0 + eps * vv) - g(w0 - eps * vv)) / (2 * eps))


@pytest.mark.parametrize("mode", ["auto", "reverse", "forward"])
def test_hvp_matches_dense_hessian_and_finite_differences(mode):
    _, params, X, y, loss = _mlp()
    v = {k: torch.randn_like(p) for k, p in params.items()}
    out = bl.hvp(loss, params, v, X, y, mode=mode)
    fl = Flat(params)
    H = _dense_hessian(loss, params, X, y)
    assert rel_err(fl.flatten(out), H @ fl.flatten(v)) < 1e-12
    assert tree_rel_err(out, _fd_hvp(loss, params, v, X, y)) < 1e-7
    assert all(out[k].shape == params[k].shape for k in params)


def test_operator_reuses_graph_and_counts_products():
    _, params, X, y, loss = _mlp()
    op = bl.HessianOperator(lambda p, X, y: loss(p, X, y), params, None, (X, y))
    H = _dense_hessian(loss, params, X, y)
    for _ in range(3):
        v = torch.randn(op.flat.size, dtype=DT)
        assert rel_err(op.matvec_flat(v), H @ v) < 1e-12
    assert op.matvecs == 3
    w = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    g = torch.autograd.grad(loss(w, X, y), list(w.values()))
    assert abs(float(op.grad_norm) - float(torch.cat([t.reshape(-1) for t in g]).norm())) < 1e-12
    assert abs(float(op.loss) - float(loss(params, X, y))) < 1e-14


def test_mixed_vjp_against_closed_form():
    # f(w, h) = ½ Σ e^{h} w² + <c, w> h_s  ->  ∇_w f = e^h w + c h_s
    # ∇_h <∇_w f, u> = e^h w u  (per-entry),  ∇_{h_s} = <c, u>
    w = torch.randn(4, dtype=DT)
    h = {"l": torch.randn(4, dtype=DT), "s": torch.tensor(0.7, dtype=DT), "unused": torch.zeros(2, dtype=DT)}
    c = torch.randn(4, dtype=DT)
    u = torch.randn(4, dtype=DT)

    def f(p, h):
        return 0.5 * (h["l"].exp() * p["w"] ** 2).sum() + (c * p["w"]).sum() * h["s"]

    for mode in ["reverse", "forward"]:
        out = bl.mixed_vjp(f, {"w": w}, h, {"w": u}, mode=mode)
        assert rel_err(out["l"], h["l"].exp() * w * u) < 1e-14
        assert rel_err(out["s"], c @ u) < 1e-14
        assert torch.equal(out["unused"], torch.zeros(2, dtype=DT))


def test_mixed_vjp_network_against_finite_differences():
    net, params, X, y, _ = _mlp()
    h = {k: torch.randn_like(p) * 0.1 for k, p in params.items()}  # per-weight log decays

    def f(p, h, X, y):
        ce = torch.nn.functional.cross_entropy(functional_call(net, p, (X,)), y)
        return ce + 0.5 * sum((h[k].exp() * p[k] ** 2).sum() for k in p)

    u = {k: torch.randn_like(p) for k, p in params.items()}
    out = bl.mixed_vjp(f, params, h, u, X, y)
    # FD in h of <∇_w f(w, h), u>
    fl = Flat(h)
    h0, eps = fl.flatten(h), 1e-6

    def inner_dot(hv):
        w = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        g = torch.autograd.grad(f(w, fl.unflatten(hv), X, y), list(w.values()))
        return sum((gi * u[k]).sum() for gi, k in zip(g, w))

    fd = torch.stack([(inner_dot(h0 + eps * e) - inner_dot(h0 - eps * e)) / (2 * eps)
                      for e in torch.eye(fl.size, dtype=DT)])
    assert rel_err(fl.flatten(out), fd) < 1e-7


def test_non_differentiable_backward_is_never_a_silent_zero():
    w = {"w": torch.tensor([1.0, 2.0], dtype=DT)}
    v = {"w": torch.tensor([1.0, 1.0], dtype=DT)}
    cube = cube_fn(with_jvp=False)
    # reverse mode cannot see the missing second derivative: it must at least warn.
    with pytest.warns(UserWarning, match="carries no autograd graph"):
        bl.hvp(lambda p: cube.apply(p["w"]).sum(), w, v, mode="reverse")
    # auto mode tries forward-over-reverse, which fails for lack of a jvp rule: a clear error.
    with pytest.raises(RuntimeError, match="once_differentiable"):
        bl.hvp(lambda p: cube.apply(p["w"]).sum(), w, v)


def test_auto_mode_linear_term_is_exactly_zero():
    w = {"w": torch.tensor([1.0, 2.0], dtype=DT), "lin": torch.ones(2, dtype=DT)}
    v = {"w": torch.ones(2, dtype=DT), "lin": torch.ones(2, dtype=DT)}
    out = bl.hvp(lambda p: (p["w"] ** 3).sum() + p["lin"].sum(), w, v)
    assert torch.allclose(out["w"], 6 * w["w"]) and torch.equal(out["lin"], torch.zeros(2, dtype=DT))


def test_hvp_unused_parameter_gives_zero_row():
    w = {"a": torch.tensor([1.0, 2.0], dtype=DT), "b": torch.tensor([3.0], dtype=DT), "lin": torch.ones(2, dtype=DT)}
    v = {k: torch.ones_like(t) for k, t in w.items()}

    def f(p):
        return (p["a"] ** 2).sum() + p["lin"].sum()   # b unused, lin linear

    out = bl.hvp(f, w, v)  # "lin" is linear: auto mode verifies its zero row by forward mode
    assert torch.equal(out["a"], torch.tensor([2.0, 2.0], dtype=DT))
    assert torch.equal(out["b"], torch.zeros(1, dtype=DT))
    assert torch.equal(out["lin"], torch.zeros(2, dtype=DT))


def test_hvp_input_errors():
    w = {"w": torch.ones(3, dtype=DT)}
    with pytest.raises(bl.ShapeError, match=r"bilevel.hvp.*shape \(3,\)"):
        bl.hvp(lambda p: (p["w"] ** 2).sum(), w, {"w": torch.ones(4, dtype=DT)})
    with pytest.raises(bl.ShapeError, match="missing"):
        bl.hvp(lambda p: (p["w"] ** 2).sum(), w, {"x": torch.ones(3, dtype=DT)})
    with pytest.raises(bl.ShapeError, match=r"scalar.*\.mean\(\)"):
        bl.hvp(lambda p: p["w"] ** 2, w, w)
    with pytest.raises(TypeError, match="dict"):
        bl.hvp(lambda p: (p ** 2).sum(), torch.ones(3), torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        bl.hvp(lambda p: p["w"].sum(), {"w": torch.ones(3, dtype=torch.long)}, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="mode"):
        bl.hvp(lambda p: (p["w"] ** 2).sum(), w, w, mode="sideways")


def test_hvp_does_not_touch_inputs_or_their_grads():
    p = torch.randn(3, dtype=DT, requires_grad=True)
    before = p.detach().clone()
    out = bl.hvp(lambda q: (q["w"] ** 4).sum(), {"w": p}, {"w": torch.ones(3, dtype=DT)})
    assert p.grad is None and torch.equal(p.detach(), before)
    assert not out["w"].requires_grad
    assert rel_err(out["w"], 12 * before ** 2) < 1e-14


def test_forward_mode_products_see_the_same_dropout_mask():
    torch.manual_seed(0)
    w = {"w": torch.randn(6, dtype=DT)}
    drop = torch.nn.Dropout(0.5)

    def f(p):   # with a fixed mask m: f = Σ (m ⊙ w)^3 / ..., H = diag(6 m² w)·scale
        return (drop(p["w"]) ** 3).sum()

    v = {"w": torch.ones(6, dtype=DT)}
    rev = bl.HessianOperator(lambda p: f(p), w, None, (), mode="reverse")
    torch.manual_seed(0)
    fwd = bl.HessianOperator(lambda p: f(p), w, None, (), mode="forward")
    a = rev.matvec(v)["w"]
    b1, b2 = fwd.matvec(v)["w"], fwd.matvec(v)["w"]
    assert torch.equal(b1, b2)                    # the same Hessian at every product
    torch.manual_seed(0)
    c = bl.HessianOperator(lambda p: f(p), w, None, (), mode="reverse").matvec(v)["w"]
    assert torch.allclose(b1, c, rtol=1e-12) and (a != 0).any()


# -- separable penalties kept out of the double-backward graph --------------------------------
def _penalized(kind):
    net, params, X, y, loss = _mlp()
    hp, wd = bl.hparams.weight_decay(net, init=0.3, per="parameter", kind=kind)
    hp = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in hp.items()}
    data = lambda p, h, X, y: loss(p, X, y)
    return params, hp, X, y, data, wd


@pytest.mark.parametrize("kind", ["exp", "softplus"])
@pytest.mark.parametrize("closed", [True, False], ids=["closed-form", "autograd"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_operator_penalty_equals_penalty_inside_the_loss(kind, closed, mode):
    params, hp, X, y, data, wd = _penalized(kind)
    # the same penalty as a plain callable: no closed forms, so the autograd path is used
    pen = wd if closed else (lambda p, h: wd(p, h))
    full = bl.HessianOperator(lambda p, h, X, y: data(p, h, X, y) + wd(p, h), params, hp, (X, y), mode=mode)
    split = bl.HessianOperator(data, params, hp, (X, y), mode=mode, penalty=pen)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    assert tree_rel_err(split.matvec(v), full.matvec(v)) < 1e-12
    assert tree_rel_err(split.mixed_vjp(v), full.mixed_vjp(v)) < 1e-12
    assert tree_rel_err(split.grad, full.grad) < 1e-12
    assert abs(float(split.loss - full.loss)) < 1e-12 and abs(float(split.grad_norm - full.grad_norm)) < 1e-12
    # the norm read first, without the gradient tree (summed key by key)
    fresh = bl.HessianOperator(data, params, hp, (X, y), mode=mode, penalty=pen)
    assert abs(float(fresh.grad_norm - full.grad_norm)) < 1e-12 and "grad" not in vars(fresh.inner)


@pytest.mark.parametrize("per, shared", [("parameter", False), ("tensor", False), ("model", False), ("parameter", True)])
@pytest.mark.parametrize("kind", ["exp", "softplus"])
@pytest.mark.parametrize("mode", ["reverse", "gauss_newton"])
def test_quadratic_penalty_forms_equal_the_general_path(per, shared, kind, mode):
    """A quadratic penalty (``WeightDecay``) takes value, diagonal, gradient and mixed product from one
    evaluation of its decays; the general path (the same penalty as a plain callable: autograd on
    its own graph) gives the same operator. Some weights are held fixed (``fixed=``), the hparams
    are float32 over float64 weights, and one product is compared with ``H v + diag ⊙ v``."""
    net, params, X, y, loss = _mlp()
    hp, wd = bl.hparams.weight_decay(params, init=0.3, per=per, kind=kind, shared=shared)
    gen = torch.Generator().manual_seed(5)
    hp = {k: (v.detach() + 0.2 * torch.randn(v.shape, generator=gen, dtype=v.dtype)).float() for k, v in hp.items()}
    fixed = {"2.bias": params["2.bias"]}
    free = {k: v for k, v in params.items() if k not in fixed}
    if mode == "gauss_newton":
        data = lambda p, h, X, y: bl.losses.cross_entropy(functional_call(net, {**p, **fixed}, (X,)), y)  # noqa: E731
    else:
        data = lambda p, h, X, y: loss({**p, **fixed}, X, y)                                              # noqa: E731
    quad = bl.operators.make_operator(data, free, hp, (X, y), mode=mode, penalty=wd, fixed=fixed)
    general = bl.operators.make_operator(data, free, hp, (X, y), mode=mode, penalty=lambda p, h: wd(p, h), fixed=fixed)
    assert quad.term._quadratic and not general.term._quadratic
    assert quad.term.hparams_in_value == general.term.hparams_in_value == set(hp)
    v = {k: torch.randn(t.shape, generator=gen, dtype=DT) for k, t in free.items()}
    tol = 1e-6                                     # float32 decays; the forms themselves agree to rounding
    assert tree_rel_err(quad.matvec(v), general.matvec(v)) < tol
    assert tree_rel_err(quad.mixed_vjp(v), general.mixed_vjp(v)) < tol
    assert tree_rel_err(quad.grad, general.grad) < tol
    assert abs(float(quad.loss - general.loss)) < tol * float(general.loss.abs())
    assert abs(float(quad.grad_norm - general.grad_norm)) < tol * float(general.grad_norm)
    # the fused product (leaf + diag ⊙ v written into the buffer) is H v + diag ⊙ v
    fl = quad.flat
    vf = fl.flatten(v)
    expected = quad.inner.product(vf).addcmul_(quad._diag, vf)
    assert torch.equal(quad.matvec_flat(vf, out=torch.empty_like(vf)), expected)


def test_operator_penalty_on_some_tensors_and_without_hparams():
    _, params, X, y, loss = _mlp()
    pen = lambda p, h: 0.5 * (p["0.weight"] ** 4).sum()          # separable, not quadratic, one tensor
    full = bl.HessianOperator(lambda p, X, y: loss(p, X, y) + pen(p, None), params, None, (X, y))
    split = bl.HessianOperator(lambda p, X, y: loss(p, X, y), params, None, (X, y), penalty=pen)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    assert tree_rel_err(split.matvec(v), full.matvec(v)) < 1e-12
    H = _dense_hessian(lambda p, X, y: loss(p, X, y) + pen(p, None), params, X, y)
    fl = Flat(params)
    assert rel_err(split.matvec_flat(fl.flatten(v)), H @ fl.flatten(v)) < 1e-12


@pytest.mark.parametrize("coupled", [
    lambda p, h: (p["0.weight"].sum()) ** 2,                      # couples all entries of a tensor
    lambda p, h: (p["0.bias"] * p["2.bias"].sum()).sum(),          # couples two tensors
], ids=["within-tensor", "across-tensors"])
def test_operator_rejects_a_coupled_penalty(coupled):
    _, params, X, y, loss = _mlp()
    with pytest.raises(ValueError, match="separable"):
        bl.HessianOperator(lambda p, X, y: loss(p, X, y), params, None, (X, y), penalty=coupled)


def test_operator_penalty_errors():
    _, params, X, y, loss = _mlp()
    with pytest.raises(TypeError, match="penalty"):
        bl.HessianOperator(lambda p, X, y: loss(p, X, y), params, None, (X, y), penalty=3.0)
    with pytest.raises(bl.ShapeError):
        bl.HessianOperator(lambda p, X, y: loss(p, X, y), params, None, (X, y),
                           penalty=lambda p, h: p["0.bias"] ** 2)          # not a scalar


@pytest.mark.parametrize("mode", ["auto", "reverse", "forward", "gauss_newton"])
@pytest.mark.parametrize("with_penalty", [False, True])
def test_matvec_flat_into_a_buffer_equals_the_fresh_product(mode, with_penalty):
    """``matvec_flat(v, out=buf)`` writes the same product into ``buf`` and returns it (the solvers'
    loop reuses one buffer); without ``out`` each product is a fresh tensor."""
    net, params, X, y, loss = _mlp()
    hp, pen = bl.hparams.weight_decay(params, init=0.3, per="parameter")
    if mode == "gauss_newton":
        f = lambda p, h, X, y: bl.losses.cross_entropy(functional_call(net, p, (X,)), y)  # noqa: E731
    else:
        f = lambda p, h, X, y: loss(p, X, y)                                                # noqa: E731
    op = bl.HessianOperator(f, params, hp, (X, y), mode=mode, penalty=pen if with_penalty else None)
    assert getattr(op.matvec_flat, "writes_out", False)
    gen = torch.Generator().manual_seed(3)
    buf = torch.full((op.flat.size,), float("nan"), dtype=DT)
    for _ in range(2):                                   # the same buffer, twice: no stale values
        v = torch.randn(op.flat.size, dtype=DT, generator=gen)
        fresh = op.matvec_flat(v)
        got = op.matvec_flat(v, out=buf)
        assert got is buf and torch.equal(got, fresh)
    assert op.matvecs == 4
