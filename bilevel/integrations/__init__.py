"""Hyperparameter steps inside the training frameworks people already use.

Each integration is a module that imports its framework when it is imported, never before, so
``import bilevel`` and ``import bilevel.integrations`` need none of them:

* :mod:`bilevel.integrations.lightning`: :class:`~bilevel.integrations.lightning.HyperCallback`,
  a Lightning ``Callback`` (``pip install 'bilevel[lightning]'``);
* :mod:`bilevel.integrations.hf`: :class:`~bilevel.integrations.hf.HyperTrainerCallback`, a
  Hugging Face ``TrainerCallback`` (``pip install 'bilevel[hf]'``);
* :mod:`bilevel.integrations.optuna`: :func:`~bilevel.integrations.optuna.tune`, hypergradient
  tuning of the continuous hyperparameters inside an Optuna trial (``pip install 'bilevel[optuna]'``).

They use the frameworks' own extension points (callbacks, trial reports), never monkeypatching,
and check their inputs on the first batch, before any training step.
"""

__all__: list[str] = []
