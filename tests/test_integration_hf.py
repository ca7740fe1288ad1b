"""bilevel.integrations.hf.HyperTrainerCallback: hyper steps during a Hugging Face Trainer run, on a tiny
BERT built from a config (no download).

Oracle: the same run as a plain bl.HyperOptimizer loop, replaying the batches the Trainer stepped on
(recorded by its compute_loss) and the callback's batches for the hyper steps, in float64; and an
uninterrupted run for the resume from the callback's saved state."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest
import torch

import bilevel as bl

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers: "
                                                          "pip install 'bilevel[hf]'")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from bilevel.integrations.hf import HyperTrainerCallback, model_loss  # noqa: E402

g = torch.Generator().manual_seed(0)
DATA = [{"input_ids": torch.randint(0, 50, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(16)]
VAL = [{"input_ids": torch.randint(0, 50, (4, 6), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
       for _ in range(2)]


def make(unused=False):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = BertForSequenceClassification(cfg).double()
    hp, pen = bl.hparams.weight_decay(dict(model.classifier.named_parameters()), init=1e-2, per="tensor", prefix="wd")
    pen = bl.hparams.WeightDecay({"classifier." + k: v for k, v in pen.keys.items()}, "tensor", "exp")
    if unused:
        hp["unused"] = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    return model, hp, pen


def method():
    return bl.Implicit(solver=bl.CG(maxiter=3, damping=1.0, on_indefinite="stop"))


def train(model, hp, pen, cb, tmp, epochs=2, seen=None, resume=None, save="no"):
    class PenalizedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            if seen is not None:
                seen.append({k: v.clone() for k, v in inputs.items()})
            return model(**inputs).loss + pen(model, hp)

    args = TrainingArguments(str(tmp), per_device_train_batch_size=4, num_train_epochs=epochs, report_to=[],
                             save_strategy=save, use_cpu=True, disable_tqdm=True, max_grad_norm=0.0,
                             lr_scheduler_type="constant", seed=0)
    trainer = PenalizedTrainer(model, args, train_dataset=DATA, callbacks=[cb],
                               optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def callback(hp, pen, train_dataloader=None):
    return HyperTrainerCallback(hp, model_loss, penalty=pen, method=method(), val_dataloader=VAL,
                                outer_optimizer=torch.optim.Adam(hp.values(), lr=0.05),
                                train_dataloader=train_dataloader)


@pytest.mark.parametrize("batches", ["own", "trainer"])
def test_train_with_callback_equals_the_hyperoptimizer_loop(tmp_path, batches):
    """own: the hyper steps cycle the training set in order; trainer: each uses the Trainer's batch."""
    model, hp, pen = make()
    cb = callback(hp, pen, "trainer" if batches == "trainer" else None)
    seen: list = []
    train(model, hp, pen, cb, tmp_path, seen=seen)
    assert cb._hook is None                                  # removed when training ended
    assert cb.hyperoptimizer.hyper_steps == len(seen) == 8

    ref, rhp, rpen = make()
    hopt = bl.HyperOptimizer(ref, rhp, inner_loss=model_loss, outer_loss=model_loss, penalty=rpen, method=method(),
                             inner_optimizer=torch.optim.SGD(ref.parameters(), lr=0.1),
                             outer_optimizer=torch.optim.Adam(rhp.values(), lr=0.05), outer_loader=VAL)
    collate = transformers.default_data_collator
    inner_batches = [collate(DATA[i:i + 4]) for i in range(0, 16, 4)]
    for t, batch in enumerate(seen):
        hopt.inner_step(batch)
        hopt.hyper_step(batch if batches == "trainer" else inner_batches[t % 4], hopt.next_outer_batch())
    for k in hp:
        torch.testing.assert_close(hp[k], rhp[k], rtol=1e-9, atol=1e-12)
        assert hp[k].item() != pytest.approx(-4.605170185988091)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    logged = [r for r in cb_history(cb) if "bilevel/outer_loss" in r]
    assert len(logged) == 8


def cb_history(cb):
    return [{"bilevel/" + k: v for k, v in row.items()} for row in cb.hyperoptimizer.trajectory.rows]


@pytest.mark.parametrize("batches", [None, "trainer"])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(tmp_path, batches):
    model, hp, pen = make()
    train(model, hp, pen, callback(hp, pen, batches), tmp_path / "a", epochs=2)
    m2, hp2, pen2 = make()
    train(m2, hp2, pen2, callback(hp2, pen2, batches), tmp_path / "b", epochs=1, save="epoch")
    ckpt = tmp_path / "b" / "checkpoint-4"
    assert (ckpt / "bilevel_hyper.pt").exists()
    m3, hp3, pen3 = make()                                   # a fresh process would start like this
    cb = callback(hp3, pen3, batches)
    train(m3, hp3, pen3, cb, tmp_path / "b", epochs=2, resume=str(ckpt))
    assert cb.hyperoptimizer.hyper_steps == 8 and len(cb.hyperoptimizer.trajectory) == 8
    for k in hp:
        assert torch.equal(hp[k], hp3[k]), k
    for a, b in zip(model.parameters(), m3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case, match", [
    ("unused", r"\['unused'\] reach neither"),
    ("frozen", "require gradients"),
    ("empty_val", "validation loader yielded no batch"),
])
def test_bad_input_is_refused_before_training(tmp_path, case, match):
    model, hp, pen = make(unused=case == "unused")
    if case == "frozen":
        model.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    cb = HyperTrainerCallback(hp, model_loss, penalty=pen, method=method(),
                              val_dataloader=[] if case == "empty_val" else VAL)
    with pytest.raises(ValueError, match=match):
        train(model, hp, pen, cb, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_train_dataloader_name_is_refused():
    _, hp, pen = make()
    with pytest.raises(ValueError, match="'trainer' for the Trainer's own last training batch"):
        HyperTrainerCallback(hp, model_loss, penalty=pen, train_dataloader="train")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "bilevel.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'bilevel\[hf\]'"):
        importlib.import_module("bilevel.integrations.hf")
