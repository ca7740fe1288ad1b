"""Lightning: :class:`HyperCallback` takes hyperparameter steps during ``Trainer.fit``.

Lightning keeps doing what it does (automatic optimization, gradient accumulation, precision,
checkpoints); after each optimizer step (every ``every_n_steps`` of them) the callback takes one
hyper step of a :class:`bilevel.HyperOptimizer` built over the module and the Trainer's optimizer.
The inner loss is the module's own ``training_step`` loss unless you give one. The hyperparameters
and the callback's state go into Lightning checkpoints (``state_dict``/``load_state_dict``), and each
hyper step's :class:`bilevel.Trajectory` row is logged through the module's logger.

Importing this module imports Lightning (``pip install 'bilevel[lightning]'``): ``lightning.pytorch``,
or the older ``pytorch_lightning`` package when only that is installed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .._errors import check_tree
from ..hyperopt import HyperOptimizer
from .checks import callback_state, check_before_training, first_batch, require, restore_callback_state

FN = "bilevel.integrations.lightning.HyperCallback"
try:
    pl = require("lightning.pytorch", extra="lightning", package="lightning", minimum="2.0", below="3", fn=FN)
except ImportError as _err:
    try:
        pl = require("pytorch_lightning", extra="lightning", package="pytorch_lightning", minimum="2.0", below="3",
                     fn=FN)
    except ImportError:
        raise _err from None

__all__ = ["HyperCallback", "training_step_loss"]


def training_step_loss(module: Any, hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
    """The module's own ``training_step(batch, 0)`` loss (a tensor, or the ``"loss"`` of a dict).

    The module reads its hyperparameters from the dict it holds; :class:`HyperCallback`'s default
    inner loss puts the tensors a hyper step differentiates into that very dict while it calls this.

    Example:
        >>> from bilevel.integrations.lightning import training_step_loss
        >>> import lightning.pytorch as pl
        >>> class Reg(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(2, 1)
        ...     def training_step(self, batch, batch_idx):
        ...         return {"loss": F.mse_loss(self.net(batch[0]), batch[1])}
        >>> training_step_loss(Reg(), {}, (torch.zeros(3, 2), torch.zeros(3, 1))).shape
        torch.Size([])
    """
    out = module.training_step(batch, 0)
    loss = out["loss"] if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise TypeError(f"{FN}: expected training_step to return a loss tensor (or a dict with 'loss'), got "
                        f"{type(out).__name__}. Fix: return the loss, or pass inner_loss=... to the callback.")
    return loss


class HyperCallback(pl.Callback):
    """Hyperparameter steps during ``Trainer.fit``, after Lightning's own optimizer steps.

    Args:
        hparams: ``{name: Tensor}`` leaf tensors with ``requires_grad=True``, read by the module
            (keep them in a plain dict attribute, not as registered parameters, so that the
            module's optimizer does not train them).
        outer_loss: ``outer_loss(module, hparams, batch) -> scalar``, the validation loss.
        method: ``bl.Implicit(...)`` (default), ``bl.Unrolled(...)``, ``bl.FirstOrder()``...
        outer_optimizer: a ``torch.optim`` optimizer over ``hparams.values()`` (default
            ``Adam(lr=1e-2)``).
        val_dataloader: validation batches for the hyper steps (cycled); default the Trainer's
            validation dataloader.
        every_n_steps: a hyper step after every this many optimizer steps (with gradient
            accumulation, on the last micro-batch of each step).
        inner_loss: ``inner_loss(module, hparams, batch) -> scalar``; default
            :func:`training_step_loss` (then ``self.log`` calls of ``training_step`` also run
            during hyper steps: pass a loss without them to keep the logs clean).
        on_error: ``"raise"`` or ``"skip"`` (as :class:`bilevel.HyperOptimizer`).
        log: log each hyper step's :class:`bilevel.Trajectory` row (``bilevel/...``) through the
            module's logger.

    Before the first step it checks that the module has weights to train, that the validation
    loader yields batches, that every hyperparameter reaches a loss on the first batch, and that
    the Trainer has exactly one optimizer.

    Attributes:
        hyperoptimizer: the :class:`bilevel.HyperOptimizer` (built when fitting starts); its
            ``trajectory`` is the run's record.

    Example:
        >>> import lightning.pytorch as pl
        >>> from bilevel.integrations.lightning import HyperCallback
        >>> class Reg(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(3, 1)
        ...         self.hp = {"log_wd": torch.tensor(-3.0, requires_grad=True)}    # a plain dict: not trained by SGD
        ...     def training_step(self, batch, batch_idx):
        ...         return F.mse_loss(self.net(batch[0]), batch[1]) + self.hp["log_wd"].exp() * self.net.weight.square().sum()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.net.parameters(), lr=0.1)
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> train = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)   # 4 steps
        >>> val = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> module = Reg()
        >>> cb = HyperCallback(module.hp, lambda m, h, b: F.mse_loss(m.net(b[0]), b[1]), val_dataloader=val,
        ...                    method=bl.Implicit(solver=bl.CG(maxiter=3)))
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(module, train)
        >>> cb.hyperoptimizer.hyper_steps, len(cb.hyperoptimizer.trajectory)
        (4, 4)
    """

    def __init__(self, hparams: Mapping[str, Tensor], outer_loss: Callable[..., Tensor], *, method: Any = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 val_dataloader: Optional[Iterable[Any]] = None, every_n_steps: int = 1,
                 inner_loss: Optional[Callable[..., Tensor]] = None, on_error: str = "raise", log: bool = True) -> None:
        super().__init__()
        check_tree(hparams, FN, "hparams")
        #: the user's dict itself (the module reads it): the default inner loss swaps values in it
        self.hparams = hparams
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps for {FN}: {every_n_steps!r} (expected an int >= 1).")
        self.outer_loss, self.inner_loss = outer_loss, inner_loss or self._training_step_loss
        self.outer_optimizer = outer_optimizer or torch.optim.Adam(self.hparams.values(), lr=1e-2)
        self.method, self.val_dataloader, self.every_n_steps = method, val_dataloader, every_n_steps
        self.on_error, self.log = on_error, log
        self.hyperoptimizer: Optional[HyperOptimizer] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._last_step = -1
        self._checked = False

    def _training_step_loss(self, module: Any, hparams: Mapping[str, Tensor], batch: Any) -> Tensor:
        held = self.hparams
        if all(held[k] is hparams[k] for k in held):
            return training_step_loss(module, hparams, batch)
        saved = dict(held)
        held.update(hparams)                        # the tensors this hyper step differentiates
        try:
            return training_step_loss(module, hparams, batch)
        finally:
            held.update(saved)

    # -- set-up -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the HyperOptimizer over the module and the Trainer's one optimizer."""
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{FN}: expected configure_optimizers to give one optimizer (the inner one), got "
                             f"{len(trainer.optimizers)}. Fix: one optimizer over the module's weights.")
        val = self.val_dataloader if self.val_dataloader is not None else _trainer_val_loader(trainer)
        first_batch(val, "validation", FN)
        self.hyperoptimizer = HyperOptimizer(
            pl_module, self.hparams, inner_loss=self.inner_loss, outer_loss=self.outer_loss,
            inner_optimizer=trainer.optimizers[0], outer_optimizer=self.outer_optimizer, method=self.method,
            outer_loader=val, on_error=self.on_error, process_group=None)
        if self._loaded is not None:
            self._restore(self._loaded)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """On the very first batch: the checks that need data, before Lightning's first step."""
        if not self._checked:
            hopt = self.hyperoptimizer
            check_before_training(hopt, batch, first_batch(hopt.outer_loader, "validation", FN), FN)
            self._checked = True

    # -- hyper steps ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step (every ``every_n_steps``): one hyper step on this batch and the next
        validation batch; its trajectory row goes to the logger."""
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return                                          # no optimizer step since the last hyper step
        self._last_step = step
        hopt = self.hyperoptimizer
        hopt.inner_steps = step
        hopt.hyper_step(batch, hopt.next_outer_batch())
        for v in self.hparams.values():
            v.grad = None                           # Lightning's backward also reached them: not a hypergradient
        if self.log and hopt.trajectory is not None and trainer.logger is not None:
            row = hopt.trajectory.rows[-1]
            pl_module.log_dict({f"bilevel/{k}": float(v) for k, v in row.items()
                                if v is not None and k not in ("step", "inner_step")}, on_step=True, on_epoch=False)

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, outer optimizer, counters, validation position, method state, trajectory
        (Lightning saves the module and its optimizer itself)."""
        return callback_state(self.hyperoptimizer, self._last_step, self._loaded)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (now, or when fitting starts if the HyperOptimizer is not built yet)."""
        self._loaded = dict(state_dict)
        if self.hyperoptimizer is not None:
            self._restore(self._loaded)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._last_step = restore_callback_state(self.hyperoptimizer, state)
        self._checked = True


def _trainer_val_loader(trainer: Any) -> Any:
    """The Trainer's validation dataloader (the datamodule's or the module's), or None."""
    for owner in (trainer.datamodule, trainer.lightning_module):
        fn = getattr(owner, "val_dataloader", None)
        if callable(fn):
            try:
                return fn()
            except NotImplementedError:
                continue
    return None
