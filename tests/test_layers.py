"""The layer rule of DESIGN.md §2, read from the source: imports only point down, and no module
imports another module's private name."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: unit -> layer; a unit is a module of bilevel/ or a whole subpackage. Lower layers never import
#: higher ones, and units of one layer are siblings that do not import each other.
LAYERS = {
    "_errors": 0,
    "_tree": 1, "_rng": 1, "_io": 1,
    "_result": 2, "_autograd": 2, "distributed": 2, "_forward_ad": 2, "_second_order": 2,
    "kernels": 3,
    "losses": 4, "hparams": 5, "solvers": 4, "inner": 4,
    "operators": 6, "hvp": 7,
    "implicit": 8, "unroll": 8,
    "methods": 9, "_training": 9, "meta": 9, "trajectory": 9,
    "hyperopt": 10,
    "nas": 11, "plot": 11,
    "integrations": 12,
    "__init__": 13,
    "demo": 14,
    "__main__": 15,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    parts = rel.with_suffix("").parts[1:]            # drop "bilevel"
    return parts[0]


def _package_of(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = ["bilevel", "kernels"] if rel[0] == "kernels" else list(rel[:-1])
    return pkg


def _target_unit(path: Path, node: ast.ImportFrom | ast.Import, name: str | None) -> str | None:
    """The unit an import refers to (None: outside the library)."""
    if isinstance(node, ast.Import):
        mod = name.split(".")
    else:
        base = _package_of(path)
        if node.level:
            base = base[: len(base) - node.level + 1]
            mod = base + (node.module.split(".") if node.module else [])
        else:
            mod = node.module.split(".") if node.module else []
        if node.module is None and name is not None:   # from . import x: a module, or a name of the package
            folder = ROOT.joinpath(*(["kernels"] if mod[:2] == ["bilevel", "kernels"] else mod))
            if (folder / f"{name}.py").exists() or (folder / name).is_dir():
                mod = mod + [name]
    if not mod or mod[0] != "bilevel":
        return None
    if len(mod) == 1:
        return "__init__"
    return mod[1]


def _imports():
    files = sorted((ROOT / "bilevel").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, node, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    yield path, node, alias.name, node


def test_every_unit_has_a_layer():
    units = {_unit(p) for p in (ROOT / "bilevel").rglob("*.py")} | {"kernels"}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_only_point_down():
    bad = []
    for path, node, name, frm in _imports():
        src = _unit(path)
        dst = _target_unit(path, node, name if frm is None or frm.module is None else None)
        if dst is None or dst == src:
            continue
        if LAYERS[dst] >= LAYERS[src]:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({src}, layer {LAYERS[src]}) imports {dst} "
                       f"(layer {LAYERS[dst]})")
    assert not bad, "\n".join(bad)


def test_kernels_import_only_torch_and_triton():
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("torch", "triton", "__future__", "typing", "dataclasses",
                                                     "functools", "importlib", "os", "math"), (path, node.module)
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{path}: imports above kernels/ ({'.' * node.level}{node.module})")


def test_no_module_imports_another_modules_private_name():
    bad = []
    for path, node, name, frm in _imports():
        if frm is None or not name.startswith("_") or name.startswith("__"):
            continue
        if frm.module is None:             # `from . import _tl`: a private module of one's own package
            continue
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name} from "
                   f"{'.' * frm.level}{frm.module}")
    assert not bad, "\n".join(bad)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The walker itself: an upward import and a private name in a synthetic module are found."""
    src = "from .hyperopt import HyperOptimizer\nfrom ._rng import _cuda_on\n"
    node_up, node_priv = ast.parse(src).body
    fake = ROOT / "bilevel" / "solvers.py"
    assert _target_unit(fake, node_up, None) == "hyperopt" and LAYERS["hyperopt"] > LAYERS["solvers"]
    assert node_priv.names[0].name.startswith("_")
