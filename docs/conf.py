"""Sphinx configuration of the bilevel docs.

Build (from the repository root; warnings are errors, as in CI):

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Why Sphinx: it is what PyTorch and its ecosystem (torchvision, torchaudio, TorchRL, PyG) use, so
readers get the API layout they know; the library's docstrings are already written with Sphinx
roles (``:func:``, ``:class:``) and Google-style sections (napoleon); autodoc imports the real
package, so the reference cannot drift from the code. Pages are Markdown (MyST).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "bilevel"
author = "the bilevel developers"
copyright = "the bilevel developers"

try:                                   # the installed package (pip install -e ".[docs]")
    import bilevel
except ImportError:                    # a bare checkout
    sys.path.insert(0, str(ROOT))
    import bilevel
release = version = bilevel.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "bilevel_docs",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", ".gitignore"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
python_use_unqualified_type_names = True

try:
    import furo  # noqa: F401
    html_theme = "furo"
except ImportError:                    # still builds (plainer) without the theme
    html_theme = "alabaster"
html_title = f"bilevel {release}"
html_static_path: list[str] = []
