"""The documentation cannot rot: the site builds, every code block runs, every public name is documented.

Conventions (also stated in docs/contributing_docs.md):

* A fenced block whose language is ``python`` (or ``py``) in README.md or any ``docs/**/*.md``
  is executed, in order, all blocks of one file in one namespace (like a notebook), in a
  temporary working directory. Pages are self-contained; README.md gets the small context its
  blocks assume (a model, loaders, a toy problem) from :data:`README_SETUP` below.
* An illustrative block that must not run is marked by the line ``<!-- docs-test: skip -->``
  directly above its fence. Keep these few: every one is listed by ``test_skipped_blocks_are_few``.
* Other languages are not executed: ``bash``/``console`` (commands; their ``examples/*.py`` and
  ``benchmarks/*.py`` paths must exist and their ``--flags`` must be ones the script defines),
  ``text`` (output, layouts), and MyST directives such as ``{literalinclude}`` (which take code
  from files that CI runs: the examples are smoke-run by tests/test_examples.py and tests/test_nas.py).
  A fence without a language fails the test in docs/ (README.md's unlabelled fences are text).
* Every public name (``bilevel.__all__``, ``bilevel.nas``, ``bilevel.kernels``, ``bilevel.inner``,
  ``bilevel.losses``, ``bilevel.hparams``) has a docstring (constants: a ``#:`` comment above the
  assignment) and an ``.. auto*::`` entry in docs/api/*.rst. Every public function and class has an
  ``Example:`` section whose ``>>>`` lines run under doctest with only ``torch``, ``nn``, ``F`` and
  ``bl`` imported (:data:`DOCTEST_GLOBS`); lines that need a GPU carry ``# doctest: +SKIP``.
* ``sphinx-build -W`` (warnings are errors) builds the site; skipped only where Sphinx is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_helpers():
    spec = importlib.util.spec_from_file_location("bilevel_docs", DOCS / "_ext" / "bilevel_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


helpers = _load_helpers()

SKIP_MARK = "<!-- docs-test: skip -->"
RUN_LANGS = {"python", "py"}
COMMAND_LANGS = {"bash", "console", "sh", "shell"}
TEXT_LANGS = {"text", "none", "math"}
MAX_SKIPPED = 4

#: The context README.md's python blocks assume, kept tiny. The quickstart block needs a model
#: and two loaders (40 batches, so ``hyper_every=20`` takes two hyper steps); the core block a
#: toy ridge problem (float32, like the README's ``torch.tensor(0.05)``).
README_SETUP = '''
import torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import bilevel as bl

torch.manual_seed(0)
_X, _y = torch.randn(400, 10), torch.randint(0, 3, (400,))
model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
train_loader = DataLoader(TensorDataset(_X[:320], _y[:320]), batch_size=8)
val_loader = DataLoader(TensorDataset(_X[320:], _y[320:]), batch_size=40)

X_train, X_val = torch.randn(60, 5), torch.randn(40, 5)
_w = torch.randn(5)
y_train, y_val = X_train @ _w + 0.3 * torch.randn(60), X_val @ _w

def inner_loss(params, hparams, X, y):
    return ((X @ params["w"] - y) ** 2).mean() + hparams["weight_decay"].exp() * (params["w"] ** 2).sum()

def outer_loss(params, hparams, X, y):
    return ((X @ params["w"] - y) ** 2).mean()

hparams = {"weight_decay": torch.tensor(-3.0)}
_A = X_train.T @ X_train / 60 + hparams["weight_decay"].exp() * torch.eye(5)
w_star = {"w": torch.linalg.solve(_A, X_train.T @ y_train / 60)}     # the inner minimizer
'''


@dataclass
class Block:
    path: Path
    line: int           # 1-based line of the opening fence
    lang: str
    code: str
    skipped: bool

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^`\s]*)(.*)$")


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (nested fences of other lengths are content)."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).strip().lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", prev == SKIP_MARK))
    return out


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md")
                                         if "_build" not in p.parts and "_generated" not in p.parts)


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


# -- code blocks ------------------------------------------------------------------------------------
@pytest.fixture
def _restore_torch_state():
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    rng = torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_rng_state(rng)


def _runnable(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in RUN_LANGS and not b.skipped]


RUN_FILES = [p for p in doc_files() if _runnable(p)]


@pytest.mark.parametrize("path", RUN_FILES, ids=_ids(RUN_FILES))
def test_python_blocks_run(path: Path, tmp_path, monkeypatch, _restore_torch_state):
    runnable = _runnable(path)
    monkeypatch.chdir(tmp_path)                       # blocks may write files (checkpoints, plots)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    torch.manual_seed(0)
    ns: dict = {"__name__": f"docs_{path.stem}"}
    if path.name == "README.md" and path.parent == ROOT:
        exec(compile(README_SETUP, "README_SETUP", "exec"), ns)
    t0 = time.process_time()
    for b in runnable:
        try:
            exec(compile(b.code, b.where(), "exec"), ns)
        except Exception as err:                      # name the block, keep the traceback
            raise AssertionError(f"the python block at {b.where()} failed: {type(err).__name__}: {err}") from err
    # CPU time, not wall time: on a shared machine the wall clock says little (a 3 s page took 38 s)
    assert time.process_time() - t0 < 60, f"{path.name}: its blocks must stay fast (tiny sizes)"


def test_every_fence_has_a_known_language():
    bad = []
    for path in doc_files():
        for b in blocks(path):
            if not b.lang and path == ROOT / "README.md":
                continue                              # the README's unlabelled fences are text (its layout tree)
            known = b.lang in RUN_LANGS | COMMAND_LANGS | TEXT_LANGS or (b.lang.startswith("{") and b.lang.endswith("}"))
            if not known:
                bad.append(f"{b.where()} ({b.lang or 'no language'})")
            elif b.lang in ("{code-block}", "{code}", "{code-cell}"):
                bad.append(f"{b.where()} ({b.lang}: use a plain ```python fence, which is executed)")
    assert not bad, "fences need a language from the conventions in tests/test_docs.py: " + ", ".join(bad)


def test_skipped_blocks_are_few():
    skipped = [b.where() for p in doc_files() for b in blocks(p) if b.skipped]
    assert len(skipped) <= MAX_SKIPPED, f"too many illustrative (skipped) blocks: {skipped}"


def _script_flags(script: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)", script.read_text(encoding="utf-8")))


def test_commands_name_existing_scripts_and_flags():
    bad = []
    for path in doc_files():
        for b in blocks(path):
            if b.lang not in COMMAND_LANGS or b.skipped:
                continue
            for line in b.code.replace("\\\n", " ").splitlines():
                line = line.split("#")[0]
                for rel in re.findall(r"((?:examples|benchmarks|docs)/[\w/.-]+\.py)", line):
                    script = ROOT / rel
                    if not script.exists():
                        bad.append(f"{b.where()}: {rel} does not exist")
                        continue
                    after = line.split(rel, 1)[1]
                    flags = {f.split("=")[0] for f in re.findall(r"(?<!\S)(--[\w-]+)", after)}
                    missing = flags - _script_flags(script)
                    if missing and "argparse" in script.read_text(encoding="utf-8"):
                        bad.append(f"{b.where()}: {rel} has no option {sorted(missing)}")
    assert not bad, "\n".join(bad)


def test_tutorials_include_smoke_tested_examples():
    """Each tutorial is backed by an example script that CI smoke-runs (or runs its own blocks)."""
    smoke = "".join((ROOT / "tests" / f).read_text(encoding="utf-8") for f in ("test_examples.py", "test_nas.py"))
    pages = sorted((DOCS / "tutorials").glob("*.md"))
    assert len(pages) >= 6
    for page in pages:
        if page.name == "index.md":
            continue
        text = page.read_text(encoding="utf-8")
        scripts = set(re.findall(r"examples/(\w+)\.py", text))
        runs_itself = any(b.lang in RUN_LANGS and not b.skipped for b in blocks(page))
        assert scripts or runs_itself, f"{page.name}: names no example script and runs no block"
        for s in re.findall(r"\{literalinclude\}\s+\.\./\.\./examples/(\w+)\.py", text):
            assert (ROOT / "examples" / f"{s}.py").exists(), f"{page.name}: examples/{s}.py is missing"
            assert f'"{s}"' in smoke or f"{s}.py" in smoke, f"{page.name}: examples/{s}.py is not smoke-run in CI"


# -- docstrings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("modname", helpers.PUBLIC_MODULES)
def test_public_names_have_docstrings(modname: str):
    mod = importlib.import_module(modname)
    missing = [n for n in helpers.public_names(modname) if not helpers.docstring_of(modname, n)]
    assert not missing, f"{modname}: public names without a docstring (or a #: comment for constants): {missing}"
    methods = {n: helpers.undocumented_methods(getattr(mod, n)) for n in helpers.public_names(modname)
               if inspect.isclass(getattr(mod, n))}
    methods = {n: m for n, m in methods.items() if m}
    assert not methods, f"{modname}: public methods without a docstring: {methods}"


def test_every_public_name_is_in_the_api_reference():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.rst"))
    listed = set(re.findall(r"^\.\. auto(?:function|class|exception|data)::\s+(\S+)", text, re.M))
    missing = [f"{m}.{n}" for m in helpers.PUBLIC_MODULES for n in helpers.public_names(m)
               if f"{m}.{n}" not in listed]
    assert not missing, f"public names missing from docs/api/*.rst: {missing}"


# -- the site ---------------------------------------------------------------------------------------
def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("sphinx", reason="the docs build needs the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_parser", reason="the docs build needs the docs extra: pip install -e '.[docs]'")
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(DOCS), str(out), "-d", str(tmp_path / "doctrees")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for page in ("index", "quickstart", "choosing", "how_it_works", "api/core", "api/nas", "api/kernels"):
        assert (out / f"{page}.html").exists(), page
    assert (out / "_images" / "accuracy_vs_hvps.png").exists()
    api = (out / "api" / "core.html").read_text(encoding="utf-8")
    assert 'id="bilevel.implicit_hypergrad"' in api and 'id="bilevel.CG"' in api


# -- docstring examples -----------------------------------------------------------------------------
#: What every docstring example may use without importing it (like ``import bilevel as bl`` at the
#: top of a user's script); anything else an example defines itself (tiny tensors, tiny models).
DOCTEST_GLOBS = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
_EXAMPLE = re.compile(r"^\s*Examples?:{1,2}\s*$", re.M)


def _public_callables() -> list[tuple[str, object]]:
    """``(qualified name, object)`` for every public function and class (constants need no example)."""
    out = []
    for modname in helpers.PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for n in helpers.public_names(modname):
            obj = getattr(mod, n)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                out.append((f"{modname}.{n}", obj))
    return out


def test_public_docstrings_have_an_example():
    missing = [name for name, obj in _public_callables()
               if not _EXAMPLE.search(helpers._own_docstring(obj) or "") or ">>>" not in (obj.__doc__ or "")]
    assert not missing, f"public functions/classes without an ``Example:`` section of >>> lines: {missing}"


def test_docstring_examples_run(_restore_torch_state):
    """Every public docstring example runs (doctest) with only ``torch``, ``nn``, ``F``, ``bl`` imported.

    Lines that cannot run on a CPU-only machine (CUDA kernels) carry ``# doctest: +SKIP``.
    """
    import doctest

    import bilevel as bl

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures, ran, report = [], 0, []
    t0 = time.process_time()
    for name, obj in _public_callables():
        for test in finder.find(obj, name, globs={**DOCTEST_GLOBS, "bl": bl}):
            if not test.examples:
                continue
            torch.manual_seed(0)
            report.clear()
            result = runner.run(test, out=report.append, clear_globs=True)
            ran += 1
            if result.failed:
                failures.append(f"{name}:\n" + "".join(report))
    assert not failures, "docstring examples failed:\n\n" + "\n".join(failures)
    assert ran == len(_public_callables()), f"only {ran} of {len(_public_callables())} docstring examples were found"
    assert time.process_time() - t0 < 60, "docstring examples must stay fast (tiny sizes, CPU seconds)"
