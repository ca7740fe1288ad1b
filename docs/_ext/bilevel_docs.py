"""Helpers shared by the docs build (``docs/conf.py``) and ``tests/test_docs.py``.

* :func:`public_names` / :func:`docstring_of`: which names are public and what documents them
  (the docstring-coverage test and the API pages use the same definition).
* A Sphinx hook that gives module-level constants (``bl.nas.PRIMITIVES``...) the ``#:`` comment
  written above their assignment in the private module that defines them.
* :func:`accuracy_figure`: the accuracy-vs-cost figure of the "Choosing a method" page.

Imports only the standard library at module level, so the test can load it without Sphinx.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import shutil
from pathlib import Path
from typing import Any, Optional

#: The public surface whose every name must carry a docstring (and appear in docs/api/).
PUBLIC_MODULES = ("bilevel", "bilevel.nas", "bilevel.kernels", "bilevel.inner", "bilevel.losses",
                  "bilevel.hparams", "bilevel.meta", "bilevel.plot", "bilevel.integrations.lightning",
                  "bilevel.integrations.hf", "bilevel.integrations.optuna")


def public_names(modname: str) -> list[str]:
    """``__all__`` of ``modname`` without the submodules it re-exports (they are listed on their own)."""
    mod = importlib.import_module(modname)
    return [n for n in mod.__all__ if not inspect.ismodule(getattr(mod, n))]


def _doc_comment(path: Path, name: str) -> Optional[str]:
    """The ``#:`` comment lines directly above ``name = ...`` / ``name: T = ...`` in ``path``."""
    try:
        source = path.read_text(encoding="utf-8")
    except OSError:
        return None
    lines = source.splitlines()
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            doc, i = [], node.lineno - 2
            while i >= 0 and lines[i].lstrip().startswith("#:"):
                doc.insert(0, lines[i].lstrip()[2:].strip())
                i -= 1
            if doc:
                return "\n".join(doc)
    return None


def attribute_doc(modname: str, name: str) -> Optional[str]:
    """The ``#:`` doc comment of the constant ``modname.name``, searched in the package's own files."""
    mod = importlib.import_module(modname)
    files = [Path(mod.__file__)]
    if Path(mod.__file__).name == "__init__.py":
        files += sorted(Path(mod.__file__).parent.glob("*.py"))
    for f in files:
        doc = _doc_comment(f, name)
        if doc:
            return doc
    return None


def _own_docstring(obj: Any) -> Optional[str]:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        # a dataclass without a docstring gets its signature as __doc__
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(obj.__name__ + "("):
            return None
        return inspect.cleandoc(doc) if doc else None
    if inspect.isroutine(obj) or inspect.ismodule(obj) or isinstance(obj, property):
        return inspect.cleandoc(obj.__doc__) if obj.__doc__ else None
    return None          # data: only a #: comment documents it (its __doc__ is its type's)


def docstring_of(modname: str, name: str) -> Optional[str]:
    """What documents the public name ``modname.name``: its own docstring, or the ``#:`` comment
    of a constant. ``None`` if nothing does."""
    obj = getattr(importlib.import_module(modname), name)
    return _own_docstring(obj) or attribute_doc(modname, name)


def undocumented_methods(cls: type) -> list[str]:
    """Public methods and properties defined by ``cls`` itself (not inherited) without a docstring.

    ``forward`` of an ``nn.Module`` is exempt: the class docstring says what the module computes.
    """
    out = []
    for n, v in vars(cls).items():
        if n.startswith("_") or n in ("forward", "extra_repr"):
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if not (inspect.isfunction(v) or isinstance(v, property)) or _own_docstring(v):
            continue
        # an override inherits the docstring of the method it overrides (as autodoc shows it)
        if not any(_own_docstring(vars(base).get(n)) for base in cls.__mro__[1:] if n in vars(base)):
            out.append(n)
    return out


# -- Sphinx -------------------------------------------------------------------------------------
def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    if what not in ("data", "attribute"):
        return
    modname, _, attr = name.rpartition(".")
    tdoc = type(obj).__doc__
    own = inspect.cleandoc(tdoc) if isinstance(tdoc, str) else ""
    try:
        doc = attribute_doc(modname, attr)
    except Exception:     # not a module path (a class attribute): leave it
        return
    if not doc:
        return
    text = "\n".join(lines).strip()
    if doc.splitlines()[0] in text:
        return                                     # autodoc found the comment itself
    if not text or text == own.strip():            # nothing, or the docstring of the value's type
        lines[:] = doc.splitlines() + [""]
    else:                                          # e.g. "alias of Dict[str, Tensor]": keep it, after
        lines[:0] = doc.splitlines() + [""]


def accuracy_figure(docs: Path) -> str:
    """Markdown for the accuracy-vs-cost figure, written to ``docs/_generated/accuracy_plot.md``.

    The benchmark figure (``benchmarks/plots/accuracy_vs_hvps.png``, made by
    ``python benchmarks/make_results.py``) when it exists; otherwise a small figure computed now
    on a toy problem (a second); otherwise (no matplotlib) a note saying where the figure will be.
    """
    gen = docs / "_generated"
    gen.mkdir(exist_ok=True)
    bench = docs.parent / "benchmarks" / "plots" / "accuracy_vs_hvps.png"
    if bench.exists():
        shutil.copyfile(bench, gen / "accuracy_vs_hvps.png")
        return ("![Hypergradient relative error against Hessian-vector products, per solver]"
                "(_generated/accuracy_vs_hvps.png)\n\n"
                "*Relative error of the hypergradient against the number of Hessian-vector products, "
                "from `benchmarks/plots/accuracy_vs_hvps.png` (`python benchmarks/make_results.py`; "
                "problems and tables in `benchmarks/RESULTS.md`).*\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("*The accuracy-vs-cost figure is `benchmarks/plots/accuracy_vs_hvps.png`, made by "
                "`python benchmarks/make_results.py`; it is not in this checkout yet and matplotlib is "
                "missing, so no stand-in was drawn.*\n")
    curves = toy_accuracy_curves()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, pts in curves.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Hessian-vector products")
    ax.set_ylabel("relative error of the hypergradient")
    ax.set_title("per-feature ridge, d = 40, κ ≈ 150 (toy, built with the docs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(gen / "accuracy_vs_hvps.png", dpi=100)
    plt.close(fig)
    return ("![Hypergradient relative error against Hessian-vector products, per solver]"
            "(_generated/accuracy_vs_hvps.png)\n\n"
            "*A stand-in computed when the docs were built (a per-feature ridge regression with 40 "
            "features, float64, error against `bl.Exact()`). The benchmark figure on three problems "
            "will be `benchmarks/plots/accuracy_vs_hvps.png` (`python benchmarks/make_results.py`); "
            "the docs show it instead as soon as it exists.*\n")


def toy_accuracy_curves() -> dict[str, list[tuple[int, float]]]:
    """``{solver: [(Hessian-vector products, relative error)]}`` on a small ridge problem (float64)."""
    import torch

    import bilevel as bl

    g = torch.Generator().manual_seed(0)
    n, d = 200, 40
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    Xv = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    yv = Xv @ w_true
    h = {"l2": torch.full((d,), -5.0, dtype=torch.float64)}

    def inner(p, hp):
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.5 * (hp["l2"].exp() * p["w"] ** 2).sum()

    def outer(p, hp):
        return 0.5 * ((Xv @ p["w"] - yv) ** 2).mean()

    A = X.T @ X / n + torch.diag(h["l2"].exp())
    w = {"w": torch.linalg.solve(A, X.T @ y / n)}
    exact = bl.implicit_hypergrad(inner, outer, w, h, solver=bl.Exact())["l2"]

    def err(solver):
        hg = bl.implicit_hypergrad(inner, outer, w, h, solver=solver)
        return hg.info.solver.matvecs, float((hg["l2"] - exact).norm() / exact.norm())

    ks = (1, 2, 4, 8, 16, 32)
    lam = float(torch.linalg.eigvalsh(A)[-1])
    return {
        "CG": [err(bl.CG(maxiter=k, tol=0.0)) for k in ks],
        "Neumann (α = 1/λ_max given)": [err(bl.Neumann(steps=k, alpha=1.0 / lam)) for k in ks],
        "Neumann (α by 20 power iterations)": [err(bl.Neumann(steps=k)) for k in ks],
        "Nyström (Gaussian sketch, ρ = 0.01)": [err(bl.Nystrom(rank=k, rho=1e-2, sketch="gaussian")) for k in ks],
        "Identity": [err(bl.Identity())],
    }


def setup(app: Any) -> dict[str, Any]:
    app.connect("autodoc-process-docstring", _process_docstring)

    def _figure(app: Any) -> None:
        docs = Path(app.srcdir)
        (docs / "_generated" if (docs / "_generated").exists() else docs).mkdir(exist_ok=True)
        (docs / "_generated").mkdir(exist_ok=True)
        (docs / "_generated" / "accuracy_plot.md").write_text(accuracy_figure(docs), encoding="utf-8")

    app.connect("builder-inited", _figure)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
