"""Hugging Face ``transformers``: :class:`DistillationTrainer`, a ``Trainer`` whose loss is ``fastdistill.kd_loss``.

It subclasses :class:`transformers.Trainer` and overrides two public methods, nothing else (no monkey-patching):

- ``compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)``: student forward, K teacher
  forwards under ``no_grad``, the causal shift for causal LMs, then ``kd_loss`` (``labels`` give the hard-label
  cross-entropy and the ``ignore_index`` mask) normalised by ``num_items_in_batch``;
- ``get_batch_samples``: counts ``num_items_in_batch`` as the loss sees the labels (after the shift, with this
  trainer's ``ignore_index``), summed over the accumulated micro-batches and, with
  ``average_tokens_across_devices``, over processes. HF's own count skips the shift for some causal LMs.

Example::

    trainer = DistillationTrainer(
        model=student, args=TrainingArguments(...), train_dataset=ds, data_collator=collator,
        teachers=[teacher_a, teacher_b], temperature=2.0, ce_weight=0.1, ensemble="prob_mean",
    )
    trainer.train()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .. import functional as F
from ..training.data import logits_of


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder-only LMs (their logits at position t predict token t+1): the class is one of transformers'
    causal-LM classes (or its name ends in ``ForCausalLM``) and the config is not encoder-decoder."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    name = type(model).__name__
    causal = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM")
    return causal and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills K ``teachers`` into ``model`` with :func:`fastdistill.kd_loss`.

    Args:
        *args, **kwargs: everything ``transformers.Trainer`` takes (``model`` is the student).
        teachers: K models whose logits match the student's ``[B, (T,) V]`` (same vocabulary / label set). They are
            moved to the training device, put in eval mode and frozen.
        divergence, temperature, scale_by_temperature_sq, ensemble, teacher_weights, beta, skew, ce_weight,
            ignore_index, backend: as in :func:`fastdistill.kd_loss` (``ce_weight`` > 0 needs ``labels``).
        shift_labels: align position t with label t+1 (student, teachers and labels alike); default: on for causal
            LMs (:func:`is_causal_lm`), off otherwise. A batch that carries ``shift_labels`` (HF's padding-free
            collators) is used as given, unshifted.

    The teachers receive the same inputs as the student (minus labels); override :meth:`teacher_logits` when they
    need other inputs (another tokenizer, say).
    """

    def __init__(
        self,
        *args: Any,
        teachers: Sequence[nn.Module],
        divergence: str = "kl",
        temperature: float = 1.0,
        scale_by_temperature_sq: bool = True,
        ensemble: str = "prob_mean",
        teacher_weights: Tensor | Sequence[float] | None = None,
        beta: float = 0.5,
        skew: float = 0.1,
        ce_weight: float = 0.0,
        ignore_index: int = -100,
        shift_labels: bool | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        F.check_hyperparameters(
            divergence=divergence, temperature=temperature, ensemble=ensemble, beta=beta, skew=skew,
            ce_weight=ce_weight, reduction="mean", backend=backend, ignore_index=ignore_index,
            scale_by_temperature_sq=scale_by_temperature_sq,
        )  # fmt: skip
        if not teachers:
            raise ValueError("DistillationTrainer needs at least one teacher (teachers=[...])")
        super().__init__(*args, **kwargs)
        self.teachers = [t.to(self.args.device).eval().requires_grad_(False) for t in teachers]
        self.kd_options = dict(
            divergence=divergence, temperature=temperature, scale_by_temperature_sq=scale_by_temperature_sq,
            ensemble=ensemble, teacher_weights=teacher_weights, beta=beta, skew=skew, ce_weight=ce_weight,
            ignore_index=ignore_index, backend=backend,
        )  # fmt: skip
        self.ignore_index = ignore_index
        self.shift_labels = is_causal_lm(self.model) if shift_labels is None else shift_labels
        # compute_loss divides by num_items_in_batch itself, so training_step must not divide by the number of
        # accumulation steps again; this is the flag Trainer reads for that (set when a model takes loss kwargs).
        self.model_accepts_loss_kwargs = True
        # the loss reads "labels" even when the student's forward does not take them: keep that column
        if "labels" not in self.label_names:
            self.label_names = [*self.label_names, "labels"]

    def _loss_labels(self, batch: dict[str, Any]) -> Tensor | None:
        """The labels as the loss sees them: ``shift_labels`` if given, else ``labels`` (shifted for causal LMs)."""
        if batch.get("shift_labels") is not None:
            return batch["shift_labels"]
        labels = batch.get("labels")
        if labels is not None and self.shift_labels:
            labels = labels[..., 1:]
        return labels

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """The next ``num_batches`` micro-batches of one optimizer step, and ``num_items_in_batch``: their labels
        that are not ``ignore_index`` (after the shift), over all processes when ``average_tokens_across_devices``.
        None when a batch has no labels (each micro-batch then counts by its own mean, as in ``Trainer``)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        labels = [self._loss_labels(b) for b in batches]
        if not batches or any(lab is None for lab in labels):
            return batches, None
        count = sum(lab.ne(self.ignore_index).sum() for lab in labels).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return batches, count

    def teacher_logits(self, teacher: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Logits ``[B, (T,) V]`` of one teacher on the student's inputs (labels removed), under ``no_grad``."""
        return logits_of(teacher(**inputs))

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        """``kd_loss(student, teachers, labels=...)``: a sum over the items divided by ``num_items_in_batch`` when
        training with it (HF's gradient-accumulation contract), else the mean over this batch's labelled items."""
        inputs = dict(inputs)
        labels = self._loss_labels(inputs)
        given_shifted = inputs.pop("shift_labels", None) is not None
        inputs.pop("labels", None)  # the student must not compute its own loss
        outputs = model(**inputs)
        student = logits_of(outputs)
        with torch.no_grad():
            teachers = [self.teacher_logits(t, inputs) for t in self.teachers]
        if self.shift_labels and not given_shifted:
            student = student[..., :-1, :]
            teachers = [t[..., :-1, :] for t in teachers]
        if not model.training:
            num_items_in_batch = None  # evaluation: each batch's own mean (Trainer averages the batches)
        loss = F.kd_loss(student, teachers, labels=labels, num_items=num_items_in_batch, **self.kd_options)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items is the global count, and DDP averages the gradients over processes: undo that average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss
