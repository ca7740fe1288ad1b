"""The demo's data: datasets bundled with scikit-learn, split and standardized deterministically.

Both tasks load through :func:`load_split` (``logreg``: breast cancer or digits in
float64; ``mlp``: digits in float32), so a seed gives the same images in the same
split whichever task runs. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import numpy as np
import torch
from torch import Tensor

from .settings import DemoError

__all__ = ["DATASETS", "Split", "load_split", "require_sklearn"]

#: datasets :func:`load_split` knows (``--dataset``)
DATASETS = ("breast_cancer", "digits")


def require_sklearn() -> Any:
    """Import scikit-learn (whose bundled datasets are the demo's data) or raise :class:`DemoError`."""
    try:
        import sklearn.datasets  # noqa: F401
        import sklearn.model_selection  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise DemoError(
            "bilevel demo: expected scikit-learn (its bundled datasets are the demo's data), but it is not "
            "installed. Fix: pip install scikit-learn   (or pip install 'bilevel[examples]')."
        ) from err
    import sklearn

    return sklearn


@dataclass
class Split:
    """Standardized tensors of one train/val/test split.

    ``X*``: ``(n, d)`` features in the ``dtype`` given to :func:`load_split`; ``y*``: ``(n,)``
    labels, 0/1 in that dtype (binary) or int64 class indices (more than two classes).
    """

    X_train: Tensor
    y_train: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    n_classes: int
    feature_names: List[str]

    @property
    def binary(self) -> bool:
        return self.n_classes == 2


def load_split(dataset: str, *, seed: int = 0, n_train: int = 100, n_val: int = 200,
               dtype: torch.dtype = torch.float64) -> Split:
    """Load a dataset bundled with scikit-learn and split it deterministically.

    Args:
        dataset: ``"breast_cancer"`` (569 x 30, 2 classes) or ``"digits"`` (1797 x 64, 10 classes).
        seed: seed of the stratified split (same seed, same split).
        n_train, n_val: sizes of the train and validation sets; the test set is the rest.
        dtype: floating dtype of the features (and of binary labels).

    Returns:
        :class:`Split` with features standardized by the train mean and standard
        deviation (constant train features get scale 1).

    Raises:
        DemoError: scikit-learn is not installed.
        ValueError: unknown dataset or split sizes that do not fit.
    """
    require_sklearn()
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    loaders = {"breast_cancer": load_breast_cancer, "digits": load_digits}
    if dataset not in loaders:
        raise ValueError(f"bilevel demo: expected dataset in {tuple(loaders)}, got {dataset!r}.")
    data = loaders[dataset]()  # bundled with scikit-learn: no network access
    X, y = np.asarray(data.data, dtype=np.float64), np.asarray(data.target)
    n = X.shape[0]
    if n_train < 10 or n_val < 10 or n_train + n_val > n - 10:
        raise ValueError(f"bilevel demo: expected n_train, n_val >= 10 and n_train + n_val <= {n - 10} for "
                         f"{dataset} ({n} samples), got n_train={n_train}, n_val={n_val}.")
    X_tr, X_rest, y_tr, y_rest = train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed)
    X_va, X_te, y_va, y_te = train_test_split(X_rest, y_rest, train_size=n_val, stratify=y_rest,
                                              random_state=seed + 1)
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    n_classes = int(y.max()) + 1
    ydt = dtype if n_classes == 2 else torch.int64

    def t(a: np.ndarray, dt: torch.dtype = dtype) -> Tensor:
        # NOTE: standardized in float64, then rounded once to `dtype`: the float32 features are
        # the float64 ones rounded, whichever task loads them.
        return torch.as_tensor(a, dtype=torch.float64 if dt.is_floating_point else dt).to(dt)

    names = [str(s) for s in getattr(data, "feature_names", [f"x{i}" for i in range(X.shape[1])])]
    return Split(t((X_tr - mean) / std), t(y_tr, ydt), t((X_va - mean) / std), t(y_va, ydt),
                 t((X_te - mean) / std), t(y_te, ydt), n_classes, names)
