"""The package ships top-level kernels/ as bilevel.kernels (editable and wheel), never as `kernels`."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bilevel

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_every_subpackage_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {"bilevel" + ("." + ".".join(p.parent.relative_to(ROOT / "bilevel").parts) if p.parent != ROOT / "bilevel" else "")
               for p in (ROOT / "bilevel").rglob("__init__.py")}
    assert on_disk | {"bilevel.kernels"} == listed, "pyproject [tool.setuptools] packages must list every subpackage"
    assert cfg["package-dir"]["bilevel.kernels"] == "kernels"


def test_editable_install_imports_bilevel_kernels_from_top_level_folder():
    import bilevel.kernels as K

    if Path(bilevel.__file__).resolve().parent != ROOT / "bilevel":
        pytest.skip("bilevel is not installed from this checkout (not an editable install)")
    assert Path(K.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert callable(K.logistic_hvp) and callable(K.linear_ce_hvp)


@pytest.mark.slow
def test_wheel_ships_kernels_inside_bilevel(tmp_path):
    pytest.importorskip("setuptools")
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel offline here: {build.stderr[-500:]}")
    (whl,) = wheel_dir.glob("bilevel-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package must not ship"
    for needed in ("bilevel/kernels/__init__.py", "bilevel/kernels/_tl.py", "bilevel/kernels/logistic.py",
                   "bilevel/inner/__init__.py", "bilevel/nas/__init__.py", "bilevel/py.typed",
                   "bilevel/demo/__init__.py", "bilevel/demo/data.py", "bilevel/demo/report.py",
                   "bilevel/demo/tasks/mlp.py", "bilevel/demo/tasks/logreg.py"):
        assert needed in names, needed
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(whl)],
                   check=True)
    code = ("import importlib.util, bilevel, bilevel.kernels as K, bilevel.losses, bilevel.nas, bilevel.demo;"
            "print(bilevel.__file__); print(K.__file__);"
            "print(importlib.util.find_spec('kernels') is None)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target)), out
    assert out[2] == "True", "`import kernels` must not resolve to this project"
