"""The demo's tasks, one module each: :mod:`~bilevel.demo.tasks.mlp` (the default) and
:mod:`~bilevel.demo.tasks.logreg`.

Each has a config dataclass, a ``SOLVERS`` tuple and ``run(config=None, *, out_dir=None,
progress=True, stream=None, **overrides) -> dict``. They share data
(:mod:`bilevel.demo.data`), settings (:mod:`bilevel.demo.settings`) and the
progress bar and plots (:mod:`bilevel.demo.report`), never each other's code.
"""

from . import logreg, mlp

__all__ = ["logreg", "mlp"]
