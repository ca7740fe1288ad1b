"""torch.func transforms through @implicit_diff, roots and fixed points, against dense float64 oracles.

Every Jacobian oracle here is a dense ``torch.linalg.solve`` written out by hand (no autograd through
the decorated solvers): ``dx*/dλ = −J_x⁻¹ ∂F/∂λ`` with ``F`` the optimality residual.
"""

import pytest
import torch

import bilevel as bl
from bilevel.operators import make_operator

from conftest import cube_fn, rel_err

DT = torch.float64
TOL = 1e-8          # float64 oracles


# -- ridge with intercept, per-feature log decay λ and a linear tilt c ---------------------------------
#   L_T(w, b; λ, c) = ½‖Xw + b − y‖² + ½ Σ e^λ w² − c·w          θ = (w, b)
#   H = [[XᵀX + diag e^λ, Xᵀ1], [1ᵀX, n]],   ∂_λ∇_θ L = [diag(e^λ ⊙ w); 0],   ∂_c∇_θ L = [−I; 0]
def ridge_data(n=25, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    h = {"lam": 0.5 * torch.randn(d, generator=g, dtype=DT), "c": 0.2 * torch.randn(d, generator=g, dtype=DT)}
    return X, y, h


def ridge_inner(p, h, X, y, scale=1.0):
    r = X @ p["w"] + p["b"] - y
    return scale * (0.5 * (r ** 2).sum() + 0.5 * (h["lam"].exp() * p["w"] ** 2).sum() - h["c"] @ p["w"])


def ridge_hessian(h, X):                           # out of place, so that vmap can batch it
    n, d = X.shape
    s = X.sum(0)
    top = torch.cat([X.T @ X + torch.diag(h["lam"].exp()), s[:, None]], 1)
    return torch.cat([top, torch.cat([s, torch.full((1,), float(n), dtype=DT)])[None]], 0)


def ridge_solve(h, X, y, scale=1.0):
    """The exact minimizer (batchable: one dense solve)."""
    d = X.shape[1]
    rhs = torch.cat([X.T @ y + h["c"], y.sum().reshape(1)])
    theta = torch.linalg.solve(ridge_hessian(h, X), rhs)
    return {"w": theta[:d], "b": theta[d]}


def ridge_jacobian(h, X, y):
    """Dense oracle: (d+1) × 2d Jacobian of θ* = (w*, b*) in (λ, c)."""
    d = X.shape[1]
    w = ridge_solve(h, X, y)["w"]
    M = torch.zeros(d + 1, 2 * d, dtype=DT)
    M[:d, :d] = torch.diag(h["lam"].exp() * w)
    M[:d, d:] = -torch.eye(d, dtype=DT)
    return -torch.linalg.solve(ridge_hessian(h, X), M)


def flat_jacobian(J, d):
    """torch.func's nested Jacobian dict {out key: {in key: tensor}} as one (d+1) × 2d matrix."""
    return torch.cat([torch.cat([J["w"]["lam"], J["w"]["c"]], 1),
                      torch.cat([J["b"]["lam"], J["b"]["c"]]).reshape(1, 2 * d)], 0)


def flat(tree):
    return torch.cat([tree["w"].reshape(-1), tree["b"].reshape(-1)])


SOLVERS = {"cg": lambda: bl.CG(maxiter=200, tol=1e-13), "exact": bl.Exact}


@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_jacrev_and_jacfwd_equal_the_dense_oracle(solver, hvp_mode):
    X, y, h = ridge_data()
    fit = bl.implicit_diff(ridge_inner, solver=SOLVERS[solver](), hvp_mode=hvp_mode)(ridge_solve)
    ref = ridge_jacobian(h, X, y)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        J = jac(lambda hh: dict(fit(hh, X, y)))(h)
        assert rel_err(flat_jacobian(J, X.shape[1]), ref) < TOL, jac.__name__


def test_jvp_is_the_oracle_times_the_tangent():
    X, y, h = ridge_data()
    fit = bl.implicit_diff(ridge_inner, solver=bl.CG(maxiter=200, tol=1e-13))(ridge_solve)
    g = torch.Generator().manual_seed(5)
    t = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in h.items()}
    sol, tangent = torch.func.jvp(lambda hh: dict(fit(hh, X, y)), (h,), (t,))
    assert rel_err(flat(sol), flat(ridge_solve(h, X, y))) < 1e-12
    assert rel_err(flat(tangent), ridge_jacobian(h, X, y) @ torch.cat([t["lam"], t["c"]])) < TOL
    # plain forward-mode AD goes through the same rule
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(v, t[k]) for k, v in h.items()}
        out = fit(dual, X, y)
        tw = fwAD.unpack_dual(out["w"]).tangent
    assert rel_err(tw, tangent["w"]) < 1e-12


def outer_loss(sol, Xv, yv):
    return 0.5 * ((Xv @ sol["w"] + sol["b"] - yv) ** 2).sum()


def validation(seed=1, d=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(15, d, generator=g, dtype=DT), torch.randn(15, generator=g, dtype=DT)


def oracle_hypergrad(h, X, y, Xv, yv):
    sol = ridge_solve(h, X, y)
    gtheta = torch.cat([Xv.T @ (Xv @ sol["w"] + sol["b"] - yv), (Xv @ sol["w"] + sol["b"] - yv).sum().reshape(1)])
    return gtheta @ ridge_jacobian(h, X, y)           # (2d,): [d/dλ, d/dc]


def test_grad_and_backward_of_an_outer_loss_equal_the_oracle():
    X, y, h = ridge_data()
    Xv, yv = validation()
    fit = bl.implicit_diff(ridge_inner, solver=bl.CG(maxiter=200, tol=1e-13))(ridge_solve)
    ref = oracle_hypergrad(h, X, y, Xv, yv)
    g = torch.func.grad(lambda hh: outer_loss(fit(hh, X, y), Xv, yv))(h)
    assert rel_err(torch.cat([g["lam"], g["c"]]), ref) < TOL
    leaves = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    sol = fit(leaves, X, y)
    assert sol.info is None
    outer_loss(sol, Xv, yv).backward()
    assert rel_err(torch.cat([leaves["lam"].grad, leaves["c"].grad]), ref) < TOL
    assert sol.info.solver.solver == "CG" and sol.info.solver.converged and sol.info.inner_grad_norm < 1e-10


def hparam_batch(h, size=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(size, *v.shape, generator=g, dtype=DT) for k, v in h.items()}


def test_vmap_over_hyperparameters_matches_a_loop_and_the_oracle():
    X, y, h = ridge_data()
    Xv, yv = validation()
    fit = bl.implicit_diff(ridge_inner, solver=bl.CG(maxiter=200, tol=1e-13))(ridge_solve)
    hb = hparam_batch(h)
    items = [{k: v[i] for k, v in hb.items()} for i in range(16)]
    sols = torch.func.vmap(lambda hh: dict(fit(hh, X, y)))(hb)
    assert rel_err(sols["w"], torch.stack([ridge_solve(hi, X, y)["w"] for hi in items])) < 1e-12
    grads = torch.func.vmap(torch.func.grad(lambda hh: outer_loss(fit(hh, X, y), Xv, yv)))(hb)
    ref = torch.stack([oracle_hypergrad(hi, X, y, Xv, yv) for hi in items])
    assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), ref) < TOL
    # the transforms the other way round: the gradient of a vmapped sum
    total = torch.func.grad(lambda hh: torch.func.vmap(lambda hi: outer_loss(fit(hi, X, y), Xv, yv))(hh).sum())(hb)
    assert rel_err(torch.cat([total["lam"], total["c"]], 1), ref) < TOL
    # per-setting Jacobians: vmap over jacrev, nested vmap
    J = torch.func.vmap(torch.func.jacrev(lambda hh: dict(fit(hh, X, y))))(hb)
    assert rel_err(J["w"]["c"][7], ridge_jacobian(items[7], X, y)[:4, 4:]) < TOL
    hb2 = {k: v.reshape(4, 4, *v.shape[1:]) for k, v in hb.items()}
    nested = torch.func.vmap(torch.func.vmap(torch.func.grad(lambda hh: outer_loss(fit(hh, X, y), Xv, yv))))(hb2)
    assert rel_err(nested["lam"].reshape(16, -1), ref[:, :4]) < TOL


def test_vmap_over_data_with_unbatched_hyperparameters():
    X, y, h = ridge_data()
    Xv, yv = validation()
    fit = bl.implicit_diff(ridge_inner, solver=bl.Exact())(ridge_solve)
    g = torch.Generator().manual_seed(9)
    Xb, yb = torch.randn(5, *X.shape, generator=g, dtype=DT), torch.randn(5, *y.shape, generator=g, dtype=DT)
    grads = torch.func.vmap(torch.func.grad(lambda hh, Xi, yi: outer_loss(fit(hh, Xi, yi), Xv, yv)),
                            in_dims=(None, 0, 0))(h, Xb, yb)
    ref = torch.stack([oracle_hypergrad(h, Xi, yi, Xv, yv) for Xi, yi in zip(Xb, yb)])
    assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), ref) < TOL


def test_has_aux_and_keyword_arguments():
    X, y, h = ridge_data()
    Xv, yv = validation()

    @bl.implicit_diff(ridge_inner, solver=bl.Exact(), has_aux=True)
    def fit(hh, X, y, scale=1.0):
        sol = ridge_solve(hh, X, y, scale=scale)   # the minimizer does not depend on a positive scale
        return sol, {"residual": X @ sol["w"] + sol["b"] - y, "tag": "exact"}

    leaves = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    sol, aux = fit(leaves, X, y, scale=3.0)
    assert aux["tag"] == "exact" and not aux["residual"].requires_grad
    outer_loss(sol, Xv, yv).backward()
    ref = oracle_hypergrad(h, X, y, Xv, yv)
    assert rel_err(torch.cat([leaves["lam"].grad, leaves["c"].grad]), ref) < TOL
    # the keyword reaches the inner loss: scale=3 triples H and the mixed term, the solve is unchanged
    assert abs(sol.info.inner_loss - 3.0 * float(ridge_inner(ridge_solve(h, X, y), h, X, y))) < 1e-9
    g = torch.func.grad(lambda hh: outer_loss(fit(hh, X, y, scale=3.0)[0], Xv, yv))(h)
    assert rel_err(torch.cat([g["lam"], g["c"]]), ref) < TOL
    J = torch.func.jacfwd(lambda hh: dict(fit(hh, X, y, scale=0.5)[0]))(h)
    assert rel_err(flat_jacobian(J, X.shape[1]), ridge_jacobian(h, X, y)) < TOL


# -- the forward-mode mixed product of every operator -------------------------------------------------
def _operators():
    g = torch.Generator().manual_seed(2)
    X, yb = torch.randn(30, 5, generator=g, dtype=DT), (torch.rand(30, generator=g) < 0.5).to(DT)
    p = {"w": 0.3 * torch.randn(5, generator=g, dtype=DT)}
    hp, pen = bl.hparams.weight_decay(p, init=0.1, per="parameter")
    hp = {k: v.to(DT) for k, v in hp.items()}
    data = lambda pp, hh, X, y: bl.losses.Logistic()(pp, hh, X, y)
    mixed_in_loss = lambda pp, hh, X, y: data(pp, hh, X, y) + pen(pp, hh) + (hh[next(iter(hh))].sin() * pp["w"]).sum()
    return {
        "reverse": make_operator(mixed_in_loss, p, hp, (X, yb), mode="reverse"),
        "forward": make_operator(mixed_in_loss, p, hp, (X, yb), mode="forward"),
        "auto": make_operator(mixed_in_loss, p, hp, (X, yb)),
        "closed+penalty": make_operator(bl.losses.Logistic(), p, hp, (X, yb), penalty=pen),
        "reverse+autograd penalty": make_operator(data, p, hp, (X, yb), penalty=lambda pp, hh: pen(pp, hh)),
    }


@pytest.mark.parametrize("name", list(_operators()))
def test_mixed_jvp_is_the_transpose_of_mixed_vjp(name):
    op = _operators()[name]
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        t = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in op.hparams.items()}
        u = {k: torch.randn(v.shape, generator=g, dtype=DT) for k, v in op.params.items()}
        lhs = sum((op.mixed_jvp(t)[k] * u[k]).sum() for k in u)
        rhs = sum((op.mixed_vjp(u)[k] * t[k]).sum() for k in t)
        assert abs(float(lhs - rhs)) < 1e-12 * (1 + abs(float(rhs))), name
    assert float(sum(v.abs().sum() for v in op.mixed_jvp(t).values())) > 0      # not trivially zero


def test_mixed_jvp_closed_form():
    w, lam = torch.tensor([1.0, -2.0, 0.5], dtype=DT), torch.tensor([0.1, 0.2, -0.3], dtype=DT)
    op = bl.HessianOperator(lambda p, h: 0.5 * (h["l"].exp() * p["w"] ** 2).sum(), {"w": w}, {"l": lam})
    t = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    assert rel_err(op.mixed_jvp({"l": t})["w"], lam.exp() * w * t) < 1e-14
    with pytest.raises(bl.ShapeError, match="mixed_jvp"):
        op.mixed_jvp({"l": torch.ones(4, dtype=DT)})


OnceCube = cube_fn(with_jvp=True)      # x³ whose backward cannot be differentiated again; it has a jvp


def test_rules_through_a_once_differentiable_op():
    # ∇_w f = h ⊙ w² − 1 goes through a backward that cannot be differentiated again: hvp_mode="forward"
    # takes every product, the mixed ones included, forward over reverse
    f = lambda p, h: (h["h"] * OnceCube.apply(p["w"])).sum() / 3 - p["w"].sum()
    hh = torch.tensor([0.5, 2.0], dtype=DT)
    w_star = lambda h: h.rsqrt()                                              # H = 2 h w > 0
    op = make_operator(f, {"w": w_star(hh)}, {"h": hh}, mode="forward")
    t = torch.tensor([3.0, -1.0], dtype=DT)
    assert rel_err(op.mixed_jvp({"h": t})["w"], w_star(hh) ** 2 * t) < 1e-14
    fit = bl.implicit_diff(f, solver=bl.Exact(), hvp_mode="forward")(lambda h: {"w": w_star(h["h"])})
    ref = torch.diag(-w_star(hh) / (2 * hh))                                  # dw*/dh by the IFT, by hand
    for jac in (torch.func.jacfwd, torch.func.jacrev):
        assert rel_err(jac(lambda h: fit({"h": h})["w"])(hh), ref) < TOL, jac.__name__


# -- fixed point: T(z) = tanh(W z + U λ), ‖W‖ < 1 -------------------------------------------------------
def fixed_point_problem(d=5, m=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, d, generator=g, dtype=DT)
    W = 0.6 * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(d, m, generator=g, dtype=DT)
    T = lambda x, h, U: {"z": torch.tanh(W @ x["z"] + U @ h["u"])}

    def iterate(h, U):                             # batchable: a fixed number of contraction steps
        z = torch.zeros(d, dtype=DT)
        for _ in range(200):
            z = torch.tanh(W @ z + U @ h["u"])
        return {"z": z}

    def jacobian(u):                               # dz*/du = (I − D W)⁻¹ D U, D = diag(1 − z*²)
        D = 1 - iterate({"u": u}, U)["z"] ** 2
        return torch.linalg.solve(torch.eye(d, dtype=DT) - D[:, None] * W, D[:, None] * U)

    return T, iterate, jacobian, U, torch.randn(m, generator=g, dtype=DT)


def test_fixed_point_every_transform_against_the_dense_jacobian():
    T, iterate, jacobian, U, u = fixed_point_problem()
    fp = bl.implicit_fixed_point(T)(iterate)
    ref = jacobian(u)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        assert rel_err(jac(lambda uu: fp({"u": uu}, U)["z"])(u), ref) < TOL, jac.__name__
    c = torch.linspace(-1, 1, 5, dtype=DT)
    assert rel_err(torch.func.grad(lambda uu: fp({"u": uu}, U)["z"] @ c)(u), ref.T @ c) < TOL
    leaf = u.clone().requires_grad_(True)
    sol = fp({"u": leaf}, U)
    (sol["z"] @ c).backward()
    assert rel_err(leaf.grad, ref.T @ c) < TOL
    assert sol.info.inner_grad_norm < 1e-12 and sol.info.solver.solver == "GMRES"    # ‖T(z*) − z*‖
    ub = u + 0.2 * torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=DT)
    Jb = torch.func.vmap(torch.func.jacrev(lambda uu: fp({"u": uu}, U)["z"]))(ub)
    assert max(rel_err(Jb[i], jacobian(ub[i])) for i in range(6)) < TOL


# -- a root with a non-symmetric Jacobian: F(x) = A x + 0.1 x³ − B λ -----------------------------------
def root_problem(d=4, seed=6):
    g = torch.Generator().manual_seed(seed)
    A = 3 * torch.eye(d, dtype=DT) + torch.randn(d, d, generator=g, dtype=DT)      # far from symmetric
    B = torch.randn(d, 2, generator=g, dtype=DT)
    F = lambda x, h: {"x": A @ x["x"] + 0.1 * x["x"] ** 3 - B @ h["l"]}

    def newton(h):                                 # batchable: fixed Newton steps
        x = torch.zeros(d, dtype=DT)
        for _ in range(30):
            r = A @ x + 0.1 * x ** 3 - B @ h["l"]
            x = x - torch.linalg.solve(A + torch.diag(0.3 * x ** 2), r)
        return {"x": x}

    def jacobian(l):                               # dx*/dλ = J_x⁻¹ B,  J_x = A + diag(0.3 x²)
        x = newton({"l": l})["x"]
        return torch.linalg.solve(A + torch.diag(0.3 * x ** 2), B)

    return F, newton, jacobian, A, torch.tensor([0.7, -1.2], dtype=DT)


def test_root_with_a_non_symmetric_jacobian_against_the_dense_oracle():
    F, newton, jacobian, A, lam = root_problem()
    assert rel_err(A, A.T) > 0.3
    root = bl.implicit_root(F, solver=bl.Exact())(newton)
    ref = jacobian(lam)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        assert rel_err(jac(lambda l: root({"l": l})["x"])(lam), ref) < TOL, jac.__name__
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    leaf = lam.clone().requires_grad_(True)
    (root({"l": leaf})["x"] @ c).backward()
    assert rel_err(leaf.grad, ref.T @ c) < TOL
    lb = lam + 0.3 * torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    gb = torch.func.vmap(torch.func.grad(lambda l: root({"l": l})["x"] @ c))(lb)
    assert max(rel_err(gb[i], jacobian(lb[i]).T @ c) for i in range(5)) < TOL
    assert root.diagnostics.info.solver.extra["vmap"] == "batched: 5 systems in lockstep"
    Jb = torch.func.vmap(torch.func.jacfwd(lambda l: root({"l": l})["x"]))(lb)     # 5 items × 2 tangents
    assert max(rel_err(Jb[i], jacobian(lb[i])) for i in range(5)) < TOL
    assert root.diagnostics.info.solver.extra["vmap"] == "batched: 10 systems in lockstep"


@pytest.mark.parametrize("solver", [bl.GMRES(maxiter=50, tol=1e-13), bl.BiCGSTAB(maxiter=50, tol=1e-13),
                                    bl.NormalCG(maxiter=50, tol=1e-13)], ids=lambda s: s.name)
def test_root_with_krylov_solvers_for_non_symmetric_systems(solver):
    # NormalCG also needs the other product (J_x for the adjoint, J_xᵀ for the tangent): both directions run
    F, newton, jacobian, A, lam = root_problem()
    root = bl.implicit_root(F, solver=solver)(newton)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        assert rel_err(jac(lambda l: root({"l": l})["x"])(lam), jacobian(lam)) < 1e-9, jac.__name__


def test_root_refuses_symmetric_only_solvers_unless_asserted():
    F, newton, *_ = root_problem()
    for solver in (bl.CG(), bl.Nystrom(rank=2)):
        with pytest.raises(ValueError, match="non-symmetric.*symmetric=True"):
            bl.implicit_root(F, solver=solver)
        with pytest.raises(ValueError, match="implicit_fixed_point"):
            bl.implicit_fixed_point(lambda x, h: x, solver=solver)
    # a root that is a gradient (symmetric positive definite J_x): CG allowed with symmetric=True
    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=g, dtype=DT)
    S = M @ M.T + 4 * torch.eye(4, dtype=DT)
    root = bl.implicit_root(lambda x, h: {"x": S @ x["x"] - h["b"]}, solver=bl.CG(tol=1e-13), symmetric=True)(
        lambda h: {"x": torch.linalg.solve(S, h["b"])})
    b = torch.randn(4, generator=g, dtype=DT)
    assert rel_err(torch.func.jacrev(lambda bb: root({"b": bb})["x"])(b), torch.linalg.inv(S)) < TOL
    assert rel_err(torch.func.jacfwd(lambda bb: root({"b": bb})["x"])(b), torch.linalg.inv(S)) < TOL


# -- bad input ---------------------------------------------------------------------------------------
def test_residual_that_does_not_match_x_is_refused_at_the_call():
    lam = torch.tensor([0.7, -1.2], dtype=DT, requires_grad=True)
    F, newton, *_ = root_problem()
    wrong_key = bl.implicit_root(lambda x, h: {"r": F(x, h)["x"]})(newton)
    with pytest.raises(bl.ShapeError, match=r"implicit_root\(newton\).*same keys.*'r'"):
        wrong_key({"l": lam})
    wrong_shape = bl.implicit_root(lambda x, h: {"x": F(x, h)["x"][:2]})(newton)
    with pytest.raises(bl.ShapeError, match=r"shape \(4,\).*got \(2,\).*Fix"):
        wrong_shape({"l": lam})
    not_a_tree = bl.implicit_root(lambda x, h: F(x, h)["x"])(newton)
    with pytest.raises(bl.ShapeError, match="tree"):
        not_a_tree({"l": lam})
    assert lam.grad is None


def test_fixed_point_map_that_does_not_match_x_is_refused():
    T, iterate, _, U, u = fixed_point_problem()
    fp = bl.implicit_fixed_point(lambda x, h, U: {"z": T(x, h, U)["z"][None]})(iterate)
    leaf = u.clone().requires_grad_(True)
    with pytest.raises(bl.ShapeError, match=r"implicit_fixed_point.*T\(x, hparams, \*args\).*shape"):
        fp({"u": leaf}, U)
    assert leaf.grad is None


def test_a_solver_vmap_cannot_batch_runs_item_by_item():
    X, y, h = ridge_data()
    Xv, yv = validation()
    calls = []

    @bl.implicit_diff(ridge_inner, solver=bl.CG(maxiter=200, tol=1e-13))
    def until_converged(hh, X, y):             # data-dependent control flow: not batchable
        calls.append(1)
        sol = ridge_solve(hh, X, y)
        if float(sol["w"].norm()) > 0:
            return sol
        return sol

    hb = hparam_batch(h, 3)
    items = [{k: v[i] for k, v in hb.items()} for i in range(3)]
    sols = torch.func.vmap(lambda hh: dict(until_converged(hh, X, y)))(hb)
    assert len(calls) == 1 + 3                 # one vmapped try, then one call per item
    assert rel_err(sols["w"], torch.stack([ridge_solve(hi, X, y)["w"] for hi in items])) < 1e-12
    [note] = until_converged.diagnostics.notes
    assert "until_converged" in note and "item by item" in note and ".item()" in note
    grads = torch.func.vmap(torch.func.grad(lambda hh: outer_loss(until_converged(hh, X, y), Xv, yv)))(hb)
    assert len(calls) == 4 + 3                 # no second try: it is known not to batch
    ref = torch.stack([oracle_hypergrad(hi, X, y, Xv, yv) for hi in items])
    assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), ref) < TOL
    assert until_converged.diagnostics.info.solver.extra["vmap"] == "batched: 3 systems in lockstep"


# -- the items of a vmapped batch solved together ----------------------------------------------------
def ill_conditioned_batch(size, n=40, d=10, seed=7):
    """Ridge data with column scales 1..1e-2 and ``size`` settings of the decay from e⁴ to e⁻⁸: the
    items' Hessians range from condition ~2 to ~1e4, so CG needs a different number of steps on each."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT) * torch.logspace(0, -2, d, dtype=DT)
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)
    hb = {"lam": torch.linspace(4, -8, size, dtype=DT)[:, None] + 0.1 * torch.randn(size, d, generator=g, dtype=DT),
          "c": 0.2 * torch.randn(size, d, generator=g, dtype=DT)}
    return X, y, hb, [{k: v[i] for k, v in hb.items()} for i in range(size)]


@pytest.mark.parametrize("size", [1, 5])
def test_vmap_solves_the_items_together_each_to_its_own_convergence(size):
    X, y, hb, items = ill_conditioned_batch(size)
    Xv, yv = validation(d=X.shape[1])
    d = X.shape[1]
    fit = bl.implicit_diff(ridge_inner, solver=bl.CG(maxiter=300, tol=1e-14, check_every=1))(ridge_solve)
    one = lambda hh: outer_loss(fit(hh, X, y), Xv, yv)
    # reverse mode: one adjoint system per setting
    grads = torch.func.vmap(torch.func.grad(one))(hb)
    info = fit.diagnostics.info.solver
    assert info.extra["vmap"] == f"batched: {size} systems in lockstep" and fit.diagnostics.notes == []
    steps = [i.iterations for i in info.extra["items"]]
    assert all(i.converged for i in info.extra["items"]) and info.matvecs == max(steps)
    if size > 1:
        assert len(set(steps)) >= 3, steps     # the items stop at different iterations
    ref = torch.stack([oracle_hypergrad(hi, X, y, Xv, yv) for hi in items])
    assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), ref) < TOL
    loop = torch.stack([torch.cat(list(torch.func.grad(one)(hi).values())) for hi in items])
    assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), loop) < 1e-12
    assert fit.diagnostics.info.solver.extra.get("vmap") is None          # a plain call: one system
    # Jacobians of the solution: jacrev (d + 1 adjoint systems per setting) and jacfwd (2d tangent systems)
    for jac, systems in ((torch.func.jacrev, d + 1), (torch.func.jacfwd, 2 * d)):
        J = torch.func.vmap(jac(lambda hh: dict(fit(hh, X, y))))(hb)
        assert fit.diagnostics.info.solver.extra["vmap"] == f"batched: {size * systems} systems in lockstep"
        for i, hi in enumerate(items):
            Ji = flat_jacobian({a: {b: J[a][b][i] for b in J[a]} for a in J}, d)
            assert rel_err(Ji, ridge_jacobian(hi, X, y)) < TOL, (jac.__name__, i)
            assert rel_err(Ji, flat_jacobian(jac(lambda hh: dict(fit(hh, X, y)))(hi), d)) < 1e-12, (jac.__name__, i)


def test_vmap_falls_back_to_one_item_at_a_time_with_a_note():
    X, y, h = ridge_data()
    Xv, yv = validation()
    hb = hparam_batch(h, 4)
    ref = torch.stack([oracle_hypergrad({k: v[i] for k, v in hb.items()}, X, y, Xv, yv) for i in range(4)])

    def unbatchable_loss(p, hh, X, y):          # vmap cannot batch a host read of a batched tensor
        float(hh["lam"].detach().sum())
        return ridge_inner(p, hh, X, y)

    cases = {"GMRES has no batched solve": bl.implicit_diff(ridge_inner, solver=bl.GMRES(tol=1e-13))(ridge_solve),
             "cannot batch the loss": bl.implicit_diff(unbatchable_loss, solver=bl.CG(tol=1e-13))(ridge_solve)}
    for why, fit in cases.items():
        grads = torch.func.vmap(torch.func.grad(lambda hh: outer_loss(fit(hh, X, y), Xv, yv)))(hb)
        assert rel_err(torch.cat([grads["lam"], grads["c"]], 1), ref) < TOL, why
        [note] = fit.diagnostics.notes
        assert "solved the 4 vmapped items one by one" in note and why in note, note
        vmap_info = fit.diagnostics.info.solver.extra["vmap"]
        assert vmap_info.startswith("per item: ") and why in vmap_info, vmap_info


def test_has_aux_without_a_pair_and_second_derivatives_are_refused():
    X, y, h = ridge_data()
    fit = bl.implicit_diff(ridge_inner, has_aux=True)(ridge_solve)
    leaves = {k: v.clone().requires_grad_(True) for k, v in h.items()}
    with pytest.raises(TypeError, match=r"\(solution, aux\).*has_aux=False"):
        fit(leaves, X, y)
    fit = bl.implicit_diff(ridge_inner, solver=bl.Exact())(ridge_solve)
    with pytest.raises(NotImplementedError, match="second derivatives|again"):
        torch.func.jacrev(torch.func.jacrev(lambda c: fit({"lam": h["lam"], "c": c}, X, y)["b"]))(h["c"])


def test_auto_mode_sees_a_gradient_whose_graph_reaches_only_the_hyperparameters():
    """h ⊙ w³ with a once-differentiable cube: ∇_w f carries a graph through h only. Double backward
    would give a zero Hessian silently; "auto" must notice and take the products forward over reverse."""
    f = lambda p, h: (h["h"] * OnceCube.apply(p["w"])).sum() / 3 - p["w"].sum()
    hh = torch.tensor([0.5, 2.0], dtype=DT)
    w = hh.rsqrt()
    op = make_operator(f, {"w": w}, {"h": hh}, mode="auto")
    v = torch.tensor([1.0, -2.0], dtype=DT)
    assert op.mode == "forward"
    assert rel_err(op.matvec({"w": v})["w"], 2 * hh * w * v) < 1e-14          # H = diag(2 h w)
    hg = bl.implicit_hypergrad(f, lambda p, h: (p["w"] ** 2).sum(), {"w": w}, {"h": hh}, solver=bl.Exact())
    assert rel_err(hg["h"], 2 * w * (-w / (2 * hh))) < 1e-10                  # 2 w ⊙ dw*/dh
