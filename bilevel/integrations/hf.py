"""Hugging Face Trainer: :class:`HyperTrainerCallback` takes hyperparameter steps during ``Trainer.train``.

The Trainer keeps doing its steps (its optimizer, scheduler, accumulation, clipping); after each
optimizer step (every ``every_n_steps`` of them) the callback takes one hyper step of a
:class:`bilevel.HyperOptimizer` built over the model and the Trainer's optimizer. Trainer callbacks
are not shown the batch, so the hyper steps draw their training batches from ``train_dataloader``
(default: the Trainer's training set, in order, with its collator), or, with
``train_dataloader="trainer"``, take the batch the Trainer itself last trained on (seen by a forward
pre-hook on the model: PyTorch's own extension point, nothing is patched), and their validation
batches from ``val_dataloader``. The callback writes its state into each checkpoint folder the Trainer
saves (``bilevel_hyper.pt``, on ``on_save``) and reads it back when ``trainer.train(resume_from_checkpoint=...)``
starts; each hyper step's trajectory row goes into ``trainer.state.log_history``.

If the Trainer's loss uses the hyperparameters (a weight-decay penalty), add them in its
``compute_loss`` (the Trainer's own extension point) and give the callback the same ``penalty``.

Importing this module imports transformers (``pip install 'bilevel[hf]'``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .._errors import check_tree
from .._io import atomic_save
from ..hyperopt import HyperOptimizer
from .checks import callback_state, check_before_training, first_batch, require, restore_callback_state

FN = "bilevel.integrations.hf.HyperTrainerCallback"
transformers = require("transformers", extra="hf", package="transformers", minimum="4.40", below="5.25", fn=FN)

__all__ = ["HyperTrainerCallback", "model_loss"]

#: the file, in each of the Trainer's checkpoint folders, that holds the callback's state
CHECKPOINT_FILE = "bilevel_hyper.pt"

def model_loss(model: Any, hparams: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """``model(**batch).loss``: a Transformers model's own loss on a batch with ``labels`` (the default inner loss).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from bilevel.integrations.hf import model_loss
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> model_loss(model, {}, {"input_ids": torch.randint(0, 50, (2, 5)), "labels": torch.tensor([0, 1])}).shape
        torch.Size([])
    """
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, Tensor):
        raise TypeError(f"{FN}: expected the model to return a loss (a batch with 'labels'), got none. Fix: put "
                        f"labels in the batches, or pass inner_loss=... / outer_loss=... to the callback.")
    return loss


class HyperTrainerCallback(transformers.TrainerCallback):
    """Hyperparameter steps during ``Trainer.train``, after the Trainer's own optimizer steps.

    Args:
        hparams: ``{name: Tensor}`` leaf tensors with ``requires_grad=True`` (not in the model's
            optimizer).
        outer_loss: ``outer_loss(model, hparams, batch) -> scalar``; :func:`model_loss` for the
            model's own loss on validation batches.
        method: ``bl.Implicit(...)`` (default), ``bl.Unrolled(...)``, ``bl.FirstOrder()``...
        outer_optimizer: over ``hparams.values()`` (default ``Adam(lr=1e-2)``).
        val_dataloader: validation batches for the hyper steps (cycled); default the Trainer's
            evaluation dataloader.
        train_dataloader: training batches for the hyper steps (cycled); default the Trainer's
            training set in order, in batches of ``per_device_train_batch_size``, with its collator.
            ``"trainer"``: the batch of the Trainer's last training forward pass before the hyper
            step (with gradient accumulation, the last micro-batch), as Lightning's callback uses
            the batch it trained on; the Trainer's data order (and its resume) then decides them.
        every_n_steps: a hyper step after every this many optimizer steps.
        inner_loss: default :func:`model_loss`.
        penalty: ``penalty(params, hparams)`` added to the inner loss (as :class:`bilevel.HyperOptimizer`).
        on_error: ``"raise"`` or ``"skip"``.

    Before the first step it checks that the model has weights to train, that both loaders yield
    batches, and that every hyperparameter reaches a loss on the first batches.

    Attributes:
        hyperoptimizer: the :class:`bilevel.HyperOptimizer` (built when training starts).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from bilevel.integrations.hf import HyperTrainerCallback, model_loss
        >>> import tempfile
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=32))
        >>> hp, penalty = bl.hparams.weight_decay(model.classifier, init=1e-3, per="tensor", prefix="wd")
        >>> penalty = bl.hparams.WeightDecay({"classifier." + k: v for k, v in penalty.keys.items()}, "tensor", "exp")
        >>> class PenalizedTrainer(Trainer):                      # the Trainer's own loss gets the penalty too
        ...     def compute_loss(self, model, inputs, return_outputs=False, **kw):
        ...         return model(**inputs).loss + penalty(model, hp)
        >>> data = [{"input_ids": torch.randint(0, 50, (6,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        >>> cb = HyperTrainerCallback(hp, model_loss, penalty=penalty,
        ...     method=bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0, on_indefinite="stop")), val_dataloader=[
        ...     {"input_ids": torch.randint(0, 50, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}])
        >>> args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, num_train_epochs=1,
        ...     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
        >>> _ = PenalizedTrainer(model, args, train_dataset=data, callbacks=[cb]).train()
        {...}
        >>> cb.hyperoptimizer.hyper_steps
        2
    """

    def __init__(self, hparams: Mapping[str, Tensor], outer_loss: Callable[..., Tensor], *, method: Any = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 val_dataloader: Optional[Iterable[Any]] = None, train_dataloader: Optional[Iterable[Any]] = None,
                 every_n_steps: int = 1, inner_loss: Optional[Callable[..., Tensor]] = None,
                 penalty: Optional[Callable[..., Tensor]] = None, on_error: str = "raise", log: bool = True) -> None:
        self.hparams = check_tree(hparams, FN, "hparams")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps for {FN}: {every_n_steps!r} (expected an int >= 1).")
        self.outer_loss, self.inner_loss, self.penalty = outer_loss, inner_loss or model_loss, penalty
        self.outer_optimizer = outer_optimizer or torch.optim.Adam(self.hparams.values(), lr=1e-2)
        self.method, self.every_n_steps, self.on_error, self.log = method, every_n_steps, on_error, log
        if isinstance(train_dataloader, str) and train_dataloader != "trainer":
            raise ValueError(f"Invalid train_dataloader for {FN}: {train_dataloader!r} (expected an iterable of "
                             f"batches, None, or 'trainer' for the Trainer's own last training batch).")
        self.val_dataloader, self.train_dataloader = val_dataloader, train_dataloader
        self.hyperoptimizer: Optional[HyperOptimizer] = None
        self._trainer_batch: Any = None
        self._hook: Any = None
        self._in_hyper_step = False
        self._train_iter: Any = None
        self._loaded: Optional[dict[str, Any]] = None
        self._last_step = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, eval_dataloader: Any = None, **kwargs: Any) -> None:
        """Build the HyperOptimizer and check the first batches, before the Trainer's first step."""
        use_trainer = isinstance(self.train_dataloader, str)
        loader = self.train_dataloader
        if loader is None or use_trainer:           # in order: drawing from it moves no random state
            loader = torch.utils.data.DataLoader(
                train_dataloader.dataset, batch_size=args.per_device_train_batch_size,
                collate_fn=train_dataloader.collate_fn, shuffle=False)
        if not use_trainer:
            self.train_dataloader = loader
        val = self.val_dataloader if self.val_dataloader is not None else eval_dataloader
        inner_batch = first_batch(loader, "training", FN)
        first_batch(val, "validation", FN)
        self.hyperoptimizer = hopt = HyperOptimizer(
            model, self.hparams, inner_loss=self.inner_loss, outer_loss=self.outer_loss, inner_optimizer=optimizer,
            outer_optimizer=self.outer_optimizer, method=self.method, outer_loader=val, penalty=self.penalty,
            on_error=self.on_error, process_group=None)
        resume = self._resume_file(args, state) if self._loaded is None else None
        if resume is not None:                      # trainer.train(resume_from_checkpoint=...)
            self._loaded = torch.load(resume, weights_only=True)
        if self._loaded is not None:
            self._restore(self._loaded)
        else:
            check_before_training(hopt, inner_batch, first_batch(val, "validation", FN), FN)
        if use_trainer and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: remember the inputs of a training forward pass that is not our own."""
        if module.training and torch.is_grad_enabled() and not self._in_hyper_step:
            self._trainer_batch = kwargs if not args else (args[0] if len(args) == 1 and not kwargs else None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the forward pre-hook of ``train_dataloader="trainer"``."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _next_train_batch(self) -> Any:
        if self._train_iter is None:
            self._train_iter = iter(self.train_dataloader)
        try:
            return next(self._train_iter)
        except StopIteration:
            self._train_iter = iter(self.train_dataloader)
            return next(self._train_iter)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """After an optimizer step (every ``every_n_steps``): one hyper step; its row goes to the Trainer's log."""
        step = state.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        hopt = self.hyperoptimizer
        hopt.inner_steps = step
        if isinstance(self.train_dataloader, str):
            if self._trainer_batch is None:
                raise RuntimeError(f"{FN}: train_dataloader='trainer' expected the Trainer's last training batch "
                                   f"as the model's keyword arguments (model(**inputs)), got none or positional "
                                   f"ones. Fix: pass train_dataloader=... (batches for the hyper steps).")
            batch, self._trainer_batch = self._trainer_batch, None
        else:
            batch = self._next_train_batch()
        self._in_hyper_step = True
        try:
            hopt.hyper_step(batch, hopt.next_outer_batch())
        finally:
            self._in_hyper_step = False
        if self.log and hopt.trajectory is not None:
            row = hopt.trajectory.rows[-1]
            state.log_history.append({"step": step, **{f"bilevel/{k}": v for k, v in row.items()
                                                       if v is not None and k not in ("step", "inner_step")}})

    # -- checkpoints: a file beside the Trainer's own in each checkpoint folder ----------------------
    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, outer optimizer, counters, validation position, method state, trajectory
        (the Trainer saves the model, its optimizer, scheduler and RNG itself)."""
        return callback_state(self.hyperoptimizer, self._last_step, self._loaded)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (now, or when training starts)."""
        self._loaded = dict(state)
        if self.hyperoptimizer is not None:
            self._restore(self._loaded)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write :meth:`state_dict` as ``bilevel_hyper.pt`` into the checkpoint folder the Trainer just wrote."""
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            atomic_save(self.state_dict(), os.path.join(folder, CHECKPOINT_FILE))

    def _resume_file(self, args: Any, state: Any) -> Optional[str]:
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", CHECKPOINT_FILE)
        return path if state.global_step > 0 and os.path.exists(path) else None

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._last_step = restore_callback_state(self.hyperoptimizer, state)
        if isinstance(self.train_dataloader, str):  # "trainer": the Trainer restores its own data order
            return
        # the hyper steps' training batches continue where they were
        self._train_iter = None
        for _ in range(self.hyperoptimizer.hyper_steps % max(1, len(self.train_dataloader))):
            self._next_train_batch()
