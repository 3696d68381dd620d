"""The reference distillation loop: one student, K teachers (or a teacher-logit cache), ``kd_loss``.

Readable first: one optimizer step is :meth:`DistillationLoop._train_step`, and everything a step does is there.
What it guarantees:

- **Normalisation.** With labels, every micro-batch's loss is ``sum over its items / num_items``, where
  ``num_items`` counts the items whose label is not ``ignore_index`` across all the micro-batches accumulated into
  one optimizer step and across all processes (as Hugging Face's ``num_items_in_batch``), so gradient accumulation
  and data parallelism give the gradient of one big batch. Without labels every micro-batch's mean counts equally
  (but a causal LM distilled with a loss of ours that reads labels only to skip rows, such as a KDLoss of ce_weight
  0, takes its ``attention_mask`` as labels that only mask: padding carries no loss, and the count is of the
  positions kept).
- **Exact resume.** The data order is a function of (seed, epoch); a checkpoint stores the student (and trainable
  teachers, feature-term modules), optimizer, scheduler, every RNG state and the position in the data, so a run
  resumed from step N continues bit for bit like the run that never stopped. (With a ``DataLoader`` of the
  user's, as far as its order is a function of the epoch: see :meth:`DistillationLoop.fit`.)
- **Data parallel.** Under ``torchrun`` (a process group initialised, see :func:`init_distributed`) the student is
  wrapped in ``DistributedDataParallel``; each global batch of ``batch_size * world_size`` items is split across
  the processes, so N processes and one process with the same global batch take the same steps (without labels,
  up to a ragged last batch: each process's mean then counts equally, not each row).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .. import functional
from ..fused_linear import check_fusable, fused_linear_kd_loss, hidden_and_head
from ..modules import CodistillLoss, KDLoss
from . import checkpoint as ckpt
from .cache import TeacherLogitCache
from .data import (
    Batch,
    ForwardFn,
    batch_iterable,
    call_model,
    checked_device,
    collate,
    default_forward,
    detect_causal_lm,
    epoch_batches,
    epoch_permutation,
    host_checked,
    mask_labels,
    model_list,
    pad_last_position,
    shift_positions,
    split_batch,
    torchrun_world,
)
from .data import to_device as _to_device
from .metrics import MetricsLogger

LossFn = Callable[..., Tensor | tuple[Tensor, ...]]  # a NamedTuple of 0-dim parts: their sum trains
# the names of the loop's own log entries (a feature term of one of these names would add into it)
_LOGGED = frozenset({"loss", "kd", "ce", "items", "grad_norm", "lr", "steps_per_s", "step", "epoch", "split"})
_EVAL_CHUNK_ELEMENTS = 2**24  # evaluate()'s rows at a time: a 64 MiB float32 copy of the logits, whatever N and V
Data = Dataset | DataLoader | Iterable  # see DistillationLoop.fit
OptimizerArg = torch.optim.Optimizer | Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None
SchedulerArg = Any  # an LRScheduler, or a callable (optimizer, total_steps) -> LRScheduler, or None
_END = object()  # an iterable of batches has run out


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside, restoring the count after. For models this small a second thread only adds
    synchronisation (8x slower per step on a busy 2-core VM), so the demo and the examples run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and every CUDA device) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(backend: str | None = None, device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1) if not done yet.
    ``device`` is this process's (default, and for ``"cuda"`` without an index: :func:`default_device`,
    cuda:LOCAL_RANK where CUDA is available): a CUDA one becomes the current device first (NCCL's, and what
    ``"cuda"`` means to torch; else every rank would use cuda:0), and picks the default backend, ``nccl`` for CUDA,
    ``gloo`` for the CPU (NCCL cannot reduce CPU tensors). Returns (rank, world_size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if torchrun_world() > 1:  # (a ValueError naming a bad or missing variable of torchrun's environment)
        dev = process_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class FeatureTerm:
    """A loss between intermediate features of the student and of one teacher (e.g. MI-α), captured with forward
    hooks. ``loss(student_feature, teacher_feature) -> scalar`` should be a mean over the micro-batch (it is
    averaged over the micro-batches of a step); an ``nn.Module`` loss with parameters (a projection head) is
    trained with the student and checkpointed.

    Attributes:
        student_module: dotted path of a submodule of the student, as in ``student.named_modules()``.
        teacher_module: dotted path of a submodule of teacher ``teacher``.
        loss: callable ``(student_feature, teacher_feature) -> Tensor`` (0-dim).
        weight: multiplies the term in the total loss.
        teacher: index of the teacher (0..K-1).
        select: picks the tensor from a module's output; default: the output if a tensor, else ``[0]`` of a tuple,
            else ``.last_hidden_state``.
        name: the name in the logs (default ``feature/<student_module>``).
        mask_key: the name of a dict input (e.g. ``"attention_mask"``) passed on to the loss as
            ``attention_mask=`` (as ``fastdistill.MIAlphaLoss`` takes it for ``[B, L, D]`` hidden states).
    """

    student_module: str
    teacher_module: str
    loss: Callable[..., Tensor]
    weight: float = 1.0
    teacher: int = 0
    select: Callable[[Any], Tensor] | None = None
    name: str | None = None
    mask_key: str | None = None


def _default_select(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot pick a feature tensor from {type(output).__name__}; give FeatureTerm(select=...)")


class DistillationLoop:
    """Train ``student`` against K ``teachers`` (or a :class:`~fastdistill.training.cache.TeacherLogitCache`).

    Args:
        student: any ``nn.Module``; its forward (see ``forward``) returns logits ``[B, *, V]``.
        teachers: K modules with the same output shape. Frozen (eval mode, ``no_grad``) unless ``train_teachers``.
        loss: the distillation loss, ``loss(student_logits [*, V], teacher_logits, labels [*] | None, *,
            num_items=None[, sample_weight=])``, where teacher_logits is a list of K ``[*, V]`` tensors (live
            teachers) or a ``[K, *, V]`` tensor (cache): a :class:`fastdistill.KDLoss` (its ``reduction`` must be
            "mean") or any callable with that signature; "kd" (the default) is ``KDLoss()``: KL, T = 1; logged as
            ``kd``. With no teachers and no cache the loss is the hard-label cross-entropy, logged as ``ce``. None:
            no loss on the logits, the ``feature_terms`` are the whole loss (the models' outputs need no logits
            then). A loss may return a NamedTuple of 0-dim parts (their sum trains; each is logged under its name),
            and may have ``set_progress(step, total_steps)``, called before every optimizer step (scheduled weights,
            e.g. ``WeakTeacherKDLoss``).
        optimizer: an optimizer over :meth:`parameters`, or a callable ``params -> optimizer``; default AdamW(lr
            1e-3).
        scheduler: an LR scheduler, or a callable ``(optimizer, total_steps) -> scheduler`` (built in :meth:`fit`);
            stepped once per optimizer step.
        teacher_cache: cached teacher logits instead of teacher forwards; row i is dataset item i.
        train_teachers: teachers train too (their forward keeps gradients, their parameters join the optimizer,
            checkpoints and the default evaluation). Co-training two models: one teacher,
            ``loss=CodistillLoss(...)`` (each model its own hard loss plus a KL toward the other's output,
            stop-gradient on the target, in one fused op). With a ``KDLoss`` a teacher's only signal is
            ``kd_loss``'s gradient to its logits: the divergence pulls it toward the student, with no loss of its
            own (a warning says so).
        feature_terms: :class:`FeatureTerm` s (need live teachers).
        batch_size: items per micro-batch per process (the global micro-batch is ``batch_size * world_size``);
            like ``collate_fn``, ``shuffle`` and ``drop_last``, for map-style datasets only (a DataLoader brings its
            own).
        grad_accum_steps: micro-batches per optimizer step.
        max_grad_norm: clip the gradients' global norm to this, > 0 (None: no clipping).
        shift_labels: causal LM: position t of the logits predicts label t+1 (logits ``[B, T, V]``, labels
            ``[B, T]``); student and teacher logits and labels are shifted alike. None (the default): on for a
            causal LM of ``transformers`` (:func:`~fastdistill.training.data.detect_causal_lm`, as
            ``DistillationTrainer`` decides it), off for its other models; for a model whose class does not tell,
            off with per-item labels ``[B]`` and a :class:`ValueError` with per-position labels ``[B, T]``, rather
            than a guess (next-token targets or token labels: give True or False). A batch with one position per
            item (labels ``[B]``, logits ``[B, V]``) is not shifted, and with an explicit True is a ValueError.
            ``sample_weight`` has the labels' shape (``[B, T]``).
        ignore_index: label value of items that carry no loss (default: ``loss.ignore_index``, else -100); the
            default ``"kd"`` loss takes it, a loss with another ``ignore_index`` is a ValueError.
        forward: ``forward(model, inputs) -> logits``; default ``model(**inputs)`` for dict inputs, else
            ``model(inputs)``, taking ``.logits`` of a ModelOutput.
        collate_fn: turns a list of dataset items into a batch (default ``torch.utils.data.default_collate``).
        shuffle: a fresh permutation of the data each epoch (from ``seed`` and the epoch); else in order.
        drop_last: drop the last global micro-batch of an epoch when it is smaller than the others. Under several
            processes a last micro-batch of fewer items than processes is dropped either way (with a warning).
        amp: "auto" (bf16 autocast on CUDA when supported, else off), "bf16" (CUDA only) or "off".
        seed: seeds the data order and, when :meth:`fit` starts from scratch, the global RNGs (``seed + rank``).
        device: default: the CUDA device of this process's local rank when CUDA is available, else CPU.
        output_dir: where ``metrics.jsonl``, ``metrics.csv``, TensorBoard events and ``checkpoints/`` go (None: no
            files, except checkpoints still need it).
        log_every: log (and show in the progress bar) the mean training loss every this many optimizer steps.
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package; skipped with a warning).
        progress: a tqdm progress bar on rank 0.
        fused_linear: train with :func:`fastdistill.fused_linear_kd_loss`: the student's and the teachers'
            last hidden states and output heads (Hugging Face models: their base model's output, caught by a
            hook, and ``logits_to_keep=1``) instead of their [B, T, V] logits, which are then never formed; the loss is
            ``loss``'s (a KDLoss), the teachers frozen, a ``teacher_cache``'s logits used as they are. Evaluation
            still runs the models' plain forward.
        distributed: False under torchrun trains this process's copy alone, as one process would (no DDP, no
            sharding, no collective): e.g. a teacher that every process trains identically (same seed, same data).
            Its run writes no files (``output_dir=None``): every process would write the same ones. True (the
            default) under torchrun (``WORLD_SIZE`` > 1) needs the process group initialised first
            (:func:`init_distributed`; ``fastdistill train`` does it): without one the loop raises a ValueError
            rather than train every process alone as rank 0 of 1.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module] = (),
        *,
        loss: LossFn | Literal["kd"] | None = "kd",
        optimizer: OptimizerArg = None,
        scheduler: SchedulerArg = None,
        teacher_cache: TeacherLogitCache | None = None,
        train_teachers: bool = False,
        feature_terms: Sequence[FeatureTerm] = (),
        batch_size: int = 32,
        grad_accum_steps: int = 1,
        max_grad_norm: float | None = None,
        shift_labels: bool | None = None,
        ignore_index: int | None = None,
        forward: ForwardFn | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        amp: str = "auto",
        seed: int = 0,
        device: torch.device | str | None = None,
        output_dir: str | os.PathLike | None = None,
        log_every: int = 10,
        tensorboard: bool = False,
        progress: bool = True,
        fused_linear: bool = False,
        distributed: bool = True,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("grad_accum_steps", grad_accum_steps),
                            ("log_every", log_every)):  # fmt: skip
            functional.check_int(name, value, low=1)
        functional.check_int("seed", seed, low=0)
        for name, value in (("train_teachers", train_teachers), ("shuffle", shuffle), ("drop_last", drop_last),
                            ("tensorboard", tensorboard), ("progress", progress), ("fused_linear", fused_linear),
                            ("distributed", distributed)):  # fmt: skip
            functional.check_bool(name, value)
        functional.check_bool("shift_labels", shift_labels, allow_none=True)  # (the string "False" is true)
        teachers = model_list(teachers)
        for name, fn in (("forward", forward), ("collate_fn", collate_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if loss is not None and not isinstance(loss, str) and not callable(loss):
            raise TypeError(f"loss must be a callable, 'kd' (KDLoss()) or None, got {type(loss).__name__}")
        if teacher_cache is not None and not hasattr(teacher_cache, "kind"):
            raise TypeError(f"teacher_cache must be a TeacherLogitCache (fastdistill.training.TeacherLogitCache("
                            f"path)), got {type(teacher_cache).__name__}")  # fmt: skip
        if device is not None:
            device = checked_device(device)  # (under torchrun "cuda" without CUDA fell back to the CPU silently)
        if max_grad_norm is not None and not max_grad_norm > 0:  # 0 freezes the model, < 0 ascends the gradient
            raise ValueError(f"max_grad_norm must be None (no clipping) or > 0, got {max_grad_norm!r}")
        if teacher_cache is not None and teachers:
            raise ValueError("give teachers or teacher_cache, not both")
        if teacher_cache is not None and (feature_terms or train_teachers):
            raise ValueError("feature_terms and train_teachers need live teachers, not a teacher_cache")
        temperature = getattr(loss, "temperature", 1.0)
        if teacher_cache is not None and teacher_cache.kind == "topk" and temperature != 1.0:
            warnings.warn(f"a top-k teacher cache keeps the teacher's tail as one mass, spread evenly, so at "
                          f"temperature {temperature} the target's tail is that flat tail tempered, not the "
                          "teacher's: the divergence can be off by tens of percent (fastdistill.training.cache); "
                          "use a full cache, a larger k, or temperature 1", stacklevel=2)  # fmt: skip
        if loss is None and not feature_terms:
            raise ValueError("nothing to train: loss=None leaves no loss on the logits and there are no "
                             "feature_terms; give a loss (default 'kd': KDLoss()) or feature_terms")  # fmt: skip
        torchrun_world = _env_world_size()
        if distributed and not _dist_on() and torchrun_world > 1:
            # else every process would train alone as rank 0 of 1, on all the data, writing the same output_dir
            raise ValueError(f"WORLD_SIZE={torchrun_world} (torchrun) but no process group is initialised: call "
                             "fastdistill.training.init_distributed() before building the DistillationLoop "
                             "(fastdistill train does), or pass distributed=False (and output_dir=None) to train "
                             "each process alone")  # fmt: skip
        if not distributed and output_dir is not None and (_dist_on() or torchrun_world > 1):
            raise ValueError("distributed=False under torchrun: every process would write the same files to "
                             "output_dir; give output_dir=None")  # fmt: skip
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed and _dist_on() else (0, 1)
        # under torchrun "cuda" is this process's GPU, not cuda:0 on every rank
        self.device = process_device(device) if self.world_size > 1 or device is None else torch.device(device)
        self.amp_dtype = amp_dtype(amp, self.device)

        self.student = student.to(self.device)
        self.teachers = [t.to(self.device) for t in teachers]
        self.train_teachers = train_teachers
        for t in self.teachers:
            t.train(train_teachers)
            t.requires_grad_(train_teachers)
        self.teacher_cache = teacher_cache
        if isinstance(loss, str):
            if loss != "kd":
                raise ValueError(f"loss must be a callable, 'kd' (KDLoss()) or None (feature terms only), got "
                                 f"{loss!r}")  # fmt: skip
            loss = KDLoss() if ignore_index is None else KDLoss(ignore_index=ignore_index)
        # one ignore_index for the loss's skipped rows and the loop's num_items: else the mean is off by n_rows/n_kept
        loss_ignore = getattr(loss, "ignore_index", None)
        if ignore_index is not None and loss_ignore is not None and loss_ignore != ignore_index:
            raise ValueError(f"ignore_index={ignore_index} differs from the loss's ignore_index={loss_ignore} "
                             f"({type(loss).__name__}): give the loss that ignore_index, or leave the loop's "
                             "unset")  # fmt: skip
        if isinstance(loss, KDLoss | CodistillLoss) and loss.reduction != "mean":
            raise ValueError(f"the loop normalises by num_items: {type(loss).__name__} needs reduction='mean', got "
                             f"{loss.reduction!r}")  # fmt: skip
        if train_teachers and isinstance(loss, KDLoss):
            warnings.warn("train_teachers=True with a KDLoss: the teachers learn only from kd_loss's gradient to their "
                          "logits, which pulls each teacher toward the student, with no hard-label loss of its own; "
                          "for co-distillation (each model its own loss plus a KL toward the other's output, as Anil "
                          "et al. 2018 and CTCD) use loss=CodistillLoss(...) with one teacher",
                          stacklevel=2)  # fmt: skip
        self.loss_fn = loss
        self._own_loss = _own_loss(loss)  # vouched for: the loop's num_items, and host-checked labels / weights
        if isinstance(loss, nn.Module):  # its buffers (KDLoss's tensor of teacher weights) on the loop's device
            loss.to(self.device)
        self.fused_linear = fused_linear
        if fused_linear:
            _check_fused_linear(student, teachers, loss, train_teachers, forward)
        self.ignore_index = ignore_index if ignore_index is not None else getattr(loss, "ignore_index", -100)
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.max_grad_norm = max_grad_norm
        # None left here: the student's class does not tell, and each batch's labels decide (_shifts)
        self.shift_labels = detect_causal_lm(student) if shift_labels is None else shift_labels
        self._shift_explicit = shift_labels is not None  # an explicit True with per-item labels is an error
        self.forward = forward or default_forward
        # without a loss on the logits (feature terms only) the outputs are not searched for logits
        self._train_forward = forward or (call_model if loss is None else default_forward)
        if fused_linear:  # the models' hidden states and heads, the logits of the last position only
            self._train_forward = lambda model, inputs: hidden_and_head(model, inputs)[0]
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_every = log_every
        self.progress = progress

        # feature terms: hooks write each micro-batch's features here
        self.feature_terms = list(feature_terms)
        self._features: dict[tuple[str, int], Tensor] = {}
        self._hooks = []
        # removed with the loop when it is collected without close(); the hooks hold no reference to it
        weakref.finalize(self, _remove_hooks, self._hooks)
        for i, term in enumerate(self.feature_terms):
            if not isinstance(term, FeatureTerm):
                raise TypeError(f"feature_terms[{i}] must be a FeatureTerm, got {type(term).__name__}")
        names = [t.name or f"feature/{t.student_module}" for t in self.feature_terms]
        for i, (term, name) in enumerate(zip(self.feature_terms, names)):
            if name in _LOGGED:  # its value would be added to (or replace) the loop's own entry of that name
                raise ValueError(f"feature_terms[{i}] has the log name {name!r}, one of the loop's own "
                                 f"({', '.join(sorted(_LOGGED))}): give it another name=")  # fmt: skip
            functional.check_real(f"feature_terms[{i}].weight", term.weight, low=-math.inf, high=math.inf,
                                  low_open=True, high_open=True)  # fmt: skip
        for name in {n for n in names if names.count(n) > 1}:
            raise ValueError(f"feature_terms {[i for i, n in enumerate(names) if n == name]} share the log name "
                             f"{name!r} (two terms on one student module?): give each its own name=")  # fmt: skip
        for i, term in enumerate(self.feature_terms):
            if not 0 <= term.teacher < len(self.teachers):
                raise ValueError(f"feature_terms[{i}].teacher = {term.teacher}, but there are {len(self.teachers)}")
            select = term.select or _default_select
            for side, model, path in (("s", self.student, term.student_module),
                                      ("t", self.teachers[term.teacher], term.teacher_module)):  # fmt: skip
                try:
                    module = model.get_submodule(path)
                except AttributeError as e:
                    who = "student" if side == "s" else f"teacher {term.teacher}"
                    raise ValueError(f"feature_terms[{i}]: no submodule {path!r} in the {who}") from e
                self._hooks.append(module.register_forward_hook(self._capture_hook((side, i), select)))
            if isinstance(term.loss, nn.Module):
                term.loss.to(self.device)
        self._extra_modules: list[nn.Module] = [t.loss for t in self.feature_terms if isinstance(t.loss, nn.Module)]
        if train_teachers:
            self._extra_modules += self.teachers

        self._ddp = None
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.student, device_ids=ids)

        if optimizer is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(self.parameters())
        self.optimizer = optimizer
        self._scheduler_arg = scheduler
        self.scheduler = scheduler if _is_scheduler(scheduler) else None
        # a checkpoint's scheduler state, loaded before fit() builds the scheduler from a callable (load_checkpoint)
        self._pending_scheduler_state: dict[str, Any] | None = None
        self._step_lr: float | None = None  # the learning rate the last optimizer step took (logged as "lr")

        # position: optimizer steps done; epoch and micro-batches consumed in it
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.last_train_loss: float | None = None  # the last logged one (checkpointed: a resumed run reports it)
        self._data_size: int | None = None  # len() of the map-style dataset fit() trains on (None: another kind)
        # the steps since the last training log (their summed parts): checkpointed, so a resumed run's first log
        # averages the same steps as the run that never stopped
        self._window: dict[str, Tensor | float] = {}
        self._window_steps = 0
        self._window_restored = False  # by a checkpoint: fit() continues it instead of starting a new one
        self._window_saved: dict[str, Any] | None = None  # what save_checkpoint puts in state.json
        # stacklevel 3: a missing-tensorboard warning points at the code that built this loop
        self._metrics = MetricsLogger(self.output_dir, rank=self.rank, tensorboard=tensorboard, warn_stacklevel=3)
        # what a checkpoint saves: the trained modules; feature-term modules only when they hold state
        modules = {"student": self.student}
        if train_teachers:
            modules.update({f"teacher{k}": t for k, t in enumerate(self.teachers)})
        for i, term in enumerate(self.feature_terms):
            if isinstance(term.loss, nn.Module) and list(term.loss.state_dict()):
                modules[f"feature_term{i}"] = term.loss
        self._checkpointer = ckpt.Checkpointer(
            self.output_dir, modules, lambda: {"optimizer": self.optimizer, "scheduler": self.scheduler},
            self._run_state, self._restore_position, rank=self.rank, world_size=self.world_size, device=self.device,
            pending=lambda: ("scheduler",) if self.scheduler is None and self._scheduler_arg is not None else (),
        )  # fmt: skip

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every record :meth:`log` took, in order (``{"step", "epoch", "split", **metrics}``), on every process."""
        return self._metrics.history

    # ---------------------------------------------------------------------------------------------------------
    # pieces

    def parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer trains: the student, feature-term modules, and the teachers if trainable."""
        params = list(self.student.parameters())
        for m in self._extra_modules:
            params += list(m.parameters())
        return [p for p in params if p.requires_grad]

    def _capture_hook(self, key: tuple[str, int], select: Callable[[Any], Tensor]):
        features = self._features  # not self: a loop that is dropped is collected, and its hooks removed with it

        def hook(module, args, output):
            features[key] = select(output)

        return hook

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def batches_per_epoch(self, n: int) -> int:
        """Global micro-batches per epoch over a dataset of n items."""
        gbs = self.batch_size * self.world_size
        full, rest = divmod(n, gbs)
        # a last batch smaller than the process count would leave a process without data (DDP needs all of them)
        return full + (1 if rest and not self.drop_last and rest >= self.world_size else 0)

    def _next_indices(self, n: int) -> Tensor:
        """This process's dataset indices for the next micro-batch; advances the position."""
        if self.batch_in_epoch >= self.batches_per_epoch(n):
            self.epoch += 1
            self.batch_in_epoch = 0
        gbs = self.batch_size * self.world_size
        perm = self._perm if self._perm_epoch == self.epoch else None
        if perm is None:
            perm = self._perm = epoch_permutation(n, self.seed, self.epoch, self.shuffle)
            self._perm_epoch = self.epoch
        global_idx = perm[self.batch_in_epoch * gbs : (self.batch_in_epoch + 1) * gbs]
        self.batch_in_epoch += 1
        return global_idx.tensor_split(self.world_size)[self.rank]

    def _shifts(self, labels: Tensor | None, logits: Any = None) -> bool:
        """Whether this batch's logits (``[B, T, V]``, or a TeacherHead's hidden ``[B, T, H]``; None: not known yet)
        and labels (``[B, T]``) are aligned for a causal LM (see ``shift_labels``). A batch with one position per
        item (labels ``[B]`` or logits ``[B, V]``) has no sequence axis to shift: with an explicit
        ``shift_labels=True`` that is a ValueError, with a detected causal LM the batch is not shifted."""
        if self.shift_labels is not None:
            if not self.shift_labels:
                return False
            per_item = (labels is not None and labels.dim() < 2) or (logits is not None and _positions_dim(logits) < 3)
            if not per_item:
                return True
            if self._shift_explicit:  # else position t of item i would be scored against item i + 1
                shapes = f"labels {_shape(labels)} and logits {_shape(logits)}"
                raise ValueError(f"shift_labels=True aligns position t of logits [B, T, V] with label t+1 of labels "
                                 f"[B, T], but this batch has one position per item ({shapes}): there is no "
                                 "sequence axis to shift; give shift_labels=False")  # fmt: skip
            return False  # a causal LM whose forward returns one position per item (e.g. the last one's logits)
        if labels is None or labels.dim() < 2:
            return False  # no labels, or one per item: no positions to align
        raise ValueError(f"shift_labels=None: the student's class ({type(self.student).__name__}) does not tell "
                         f"whether labels {list(labels.shape)} at position t are the next token (a causal LM: "
                         "shift_labels=True) or the label of position t (token classification: shift_labels=False); "
                         "give DistillationLoop(shift_labels=...)")  # fmt: skip

    def _teacher_outputs(self, index: Tensor | None, batch: Batch):
        """The teachers' logits (from the cache, or their forwards: the feature hooks capture there too)."""
        if self.teacher_cache is not None:
            return self.teacher_cache.get(index, device=self.device)
        grad = torch.enable_grad() if self.train_teachers else torch.no_grad()
        with grad, self._autocast():
            return [self._train_forward(t, batch.inputs) for t in self.teachers]

    def _micro_loss(self, index: Tensor | None, batch: Batch, num_items: Tensor | None, n_micro: int):
        """The loss of one micro-batch, scaled so that summing over micro-batches and averaging over processes
        (DDP) gives the step's loss; and its parts for the logs."""
        self._features.clear()
        with self._autocast():
            student_out = self._train_forward(self._ddp or self.student, batch.inputs)
        teacher_out = self._teacher_outputs(index, batch) if (self.teachers or self.teacher_cache) else None
        total, parts = self._logit_loss(student_out, teacher_out, batch, num_items, n_micro)
        for i, term in enumerate(self.feature_terms):
            if term.mask_key and not (isinstance(batch.inputs, dict) and term.mask_key in batch.inputs):
                raise ValueError(f"feature_terms[{i}].mask_key={term.mask_key!r} reads a dict input of that name; "
                                 f"the batch's inputs are {type(batch.inputs).__name__}"
                                 + (f" with keys {sorted(batch.inputs)}" if isinstance(batch.inputs, dict) else ""))
            kw = {"attention_mask": batch.inputs[term.mask_key]} if term.mask_key else {}
            value = term.loss(self._features[("s", i)], self._features[("t", i)], **kw)
            total = total + (term.weight / n_micro) * value
            parts[term.name or f"feature/{term.student_module}"] = value.detach() / n_micro
        return total, parts

    def _logit_loss(self, student_logits, teacher_logits, batch: Batch, num_items: Tensor | None, n_micro: int):
        """The loss on the logits (``loss``, or the cross-entropy without teachers; 0 for ``loss=None``), scaled as
        in :meth:`_micro_loss`, and its parts. With ``fused_linear`` the "logits" are TeacherHead records (hidden
        states and head) and the loss is ``loss``'s KDLoss through :func:`fastdistill.fused_linear_kd_loss`."""
        if self.loss_fn is None:
            return 0.0, {}
        if self.fused_linear and teacher_logits is None:
            raise ValueError("fused_linear=True distils from teachers or a teacher_cache; this loop has neither")
        labels, sample_weight = batch.labels, batch.sample_weight
        if batch.labels_from_mask and labels.shape != _positions_shape(student_logits):
            raise ValueError(f"attention_mask {list(labels.shape)} does not line up with the positions of the logits "
                             f"{list(_positions_shape(student_logits))}, so it cannot leave the padding out of the "
                             "loss: pass labels (ignore_index where no loss)")  # fmt: skip
        if self._shifts(labels, student_logits):  # position t against token t + 1 (shift_for_causal_lm), every model
            if sample_weight is not None:  # checked before the cut, so the message names the shapes given
                expected = labels.shape if labels is not None else _positions_shape(student_logits)
                if sample_weight.shape != expected:
                    raise ValueError(f"sample_weight must have shape {list(expected)} (one weight per position, as "
                                     f"the labels), got {list(sample_weight.shape)}; a per-sequence weight [B] "
                                     "must be repeated along the positions")  # fmt: skip
            labels = None if labels is None else labels[..., 1:]
            sample_weight = None if sample_weight is None else sample_weight[..., 1:]
            if (labels is not None and not self.fused_linear
                    and (teacher_logits is None or _skips_ignored_positions(self.loss_fn))):  # fmt: skip
                # the loss is 0 at ignored positions: the labels move, the logits stay whole (their [..., :-1, :]
                # slices would be copied whole by the loss: a [B, T-1, V] buffer per model and step)
                labels = pad_last_position(labels, self.ignore_index)
                sample_weight = None if sample_weight is None else pad_last_position(sample_weight, 0)
            else:
                student_logits = shift_positions(student_logits)
                if teacher_logits is not None:
                    teacher_logits = (shift_positions(teacher_logits) if isinstance(teacher_logits, Tensor)
                                      else [shift_positions(t) for t in teacher_logits])  # fmt: skip

        # sum / num_items (global) * world: DDP's gradient average then gives sum over everything / num_items
        scale = float(self.world_size) if num_items is not None else 1.0 / n_micro
        # what our losses need not read back from the device: num_items, the loop's own count; the labels and sample
        # weights where they were checked on the host against this V (_on_device). A loss of the user's checks all.
        trusted: tuple[str, ...] = ()
        if self.fused_linear or self._own_loss:
            vocab = student_logits.weight.shape[0] if self.fused_linear else student_logits.shape[-1]
            fits = batch.min_vocab is not None and batch.min_vocab <= vocab
            trusted = ("num_items", "labels", "sample_weight") if fits else ("num_items",)
        with functional.values_checked(*trusted) if trusted else contextlib.nullcontext():
            kd = self._loss_value(student_logits, teacher_logits, labels, sample_weight, num_items)
        parts = {}
        if isinstance(kd, tuple) and hasattr(kd, "_fields"):  # named parts, e.g. CodistillLosses: their sum trains
            parts = {name: v.detach() * scale for name, v in zip(kd._fields, kd)}
            kd = sum(kd)
        # without teachers the value is the plain cross-entropy: logged as such
        parts["ce" if teacher_logits is None else "kd"] = kd.detach() * scale
        return kd * scale, parts

    def _loss_value(self, student_logits, teacher_logits, labels, sample_weight, num_items: Tensor | None):
        """The unscaled loss of :meth:`_logit_loss` (a tensor, or a named tuple of parts)."""
        if self.fused_linear:
            s = student_logits
            with self._autocast():  # the head's matmuls in the student's autocast, as its lm_head in the logits path
                return fused_linear_kd_loss(s.hidden, s.weight, teacher_logits, labels, student_head_bias=s.bias,
                                            student_head_lora=s.lora, sample_weight=sample_weight,
                                            num_items=num_items, **self.loss_fn.kd_settings())  # fmt: skip
        if teacher_logits is None:
            if labels is None:
                raise ValueError("without teachers (or a cache) the loop trains on labels; the batch has none")
            return self._cross_entropy(student_logits, labels, sample_weight, num_items)
        kw = {"num_items": num_items}
        if sample_weight is not None:
            kw["sample_weight"] = sample_weight
        return self.loss_fn(student_logits, teacher_logits, labels, **kw)

    def _hard_rows(self, logits: Tensor, labels: Tensor, sample_weight: Tensor | None,
                   use: str) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
        """Logits [N, V], labels [N] and weights [N] (float32, or None) of the loop's own cross-entropy ``use``,
        checked as kd_loss checks them (labels int64 in [0, V) or ignore_index, weights finite and >= 0; skipped
        where the loop checked them on the host: values_checked), not torch's IndexError from deep inside."""
        lab, w, _ = functional.row_arguments(
            logits, labels=labels, ignore_index=self.ignore_index, check_label_range=True, label_use=f"({use})",
            sample_weight=sample_weight, reduction="sum", num_items=None, acc=torch.float32,
            name="the student's logits",
        )  # fmt: skip
        return logits.reshape(-1, logits.shape[-1]), lab, w

    def _cross_entropy(self, logits: Tensor, labels: Tensor, sample_weight: Tensor | None,
                       num_items: Tensor | None) -> Tensor:  # fmt: skip
        """The hard-label loss without teachers: logits ``[*, V]``, labels and sample_weight ``[*]``; what
        ``kd_loss(ce_weight=1, sample_weight=...)`` computes: sum_i w_i CE_i over the non-ignored rows, divided by
        ``num_items`` (else by the count of non-ignored rows). 0-dim."""
        flat, lab, w = self._hard_rows(logits, labels, sample_weight, "the loop's cross-entropy")
        kept = lab != self.ignore_index
        # a skipped row (ignored, or of weight 0) gives 0 and a zero gradient whatever its logits hold, as in kd_loss:
        # its logits are replaced by 0 before log_softmax (a NaN at a padding position would make its gradient row
        # NaN through log_softmax's backward; an inf loss times weight 0 is NaN)
        skipped = ~kept if w is None else ~kept | (w == 0)
        flat = flat.masked_fill(skipped[:, None], 0)
        flat = flat if flat.dtype == torch.float64 else flat.float()  # kd_loss's precision: float32, or float64
        per_row = F.cross_entropy(flat, lab, ignore_index=self.ignore_index, reduction="none")  # 0 where ignored
        if w is not None:
            per_row = per_row * w
        denominator = num_items if num_items is not None else kept.sum()
        return per_row.sum() / denominator.clamp_min(1)

    def _train_step(self, micro: list[tuple[Tensor | None, Batch]]) -> dict[str, Tensor]:
        """One optimizer step over the given micro-batches (this process's share of each)."""
        counted = []
        for _, b in micro:
            # the logits are not known yet: per-item labels [B] decide alone (as _logit_loss decides with them)
            shifted = b.labels is not None and self.loss_fn is not None and self._shifts(b.labels)
            labels = b.labels[..., 1:] if shifted else b.labels
            counted.append(None if labels is None else (labels != self.ignore_index).sum())
        num_items = None
        if self.loss_fn is not None and all(c is not None for c in counted):
            num_items = torch.stack(counted).sum().to(self.device)
            if self.world_size > 1:
                dist.all_reduce(num_items)
        sums: dict[str, Tensor] = {}
        for i, (index, batch) in enumerate(micro):
            last = i == len(micro) - 1
            # gradients are all-reduced once per step, on the last micro-batch
            sync = self._ddp.no_sync() if (self._ddp is not None and not last) else contextlib.nullcontext()
            with sync:
                loss, parts = self._micro_loss(index, batch, num_items, len(micro))
                loss.backward()
            sums["loss"] = sums.get("loss", 0) + loss.detach()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v
        self._all_reduce_extra_grads()
        if self.max_grad_norm is not None:
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.parameters(), self.max_grad_norm).detach()
        self.optimizer.step()
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step took, logged (not the next one's)
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if num_items is not None:
            sums["items"] = num_items.detach().float()
        return sums

    def _all_reduce_extra_grads(self) -> None:
        """Average the gradients DDP does not see (feature-term modules, trainable teachers) over processes."""
        if self.world_size == 1:
            return
        for m in self._extra_modules:
            for p in m.parameters():
                if p.requires_grad:
                    if p.grad is None:  # every process must join every all_reduce
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world_size)

    # ---------------------------------------------------------------------------------------------------------
    # training

    def fit(
        self,
        train_data: Data,
        *,
        max_steps: int | None = None,
        epochs: float | None = None,
        eval_data: Data | None = None,
        eval_fn: Callable[[DistillationLoop], dict[str, float]] | None = None,
        eval_every: int | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Train until ``max_steps`` optimizer steps or ``epochs`` passes over ``train_data`` (whichever is first).

        Args:
            train_data: one of (items and batches as in :mod:`fastdistill.training.data`)

                - a map-style dataset (``len`` and ``[i]``): the loop batches it (``batch_size``, ``collate_fn``)
                  in an order that is a function of (seed, epoch), split across processes; resume is exact;
                - a ``torch.utils.data.DataLoader``: iterated as built, its sampler, batch size, collate_fn and
                  workers; one batch per micro-batch, on each process (give it a ``DistributedSampler`` under
                  torchrun). ``set_epoch(epoch)`` is called on its sampler (and dataset) when they have one, and
                  its shuffling order is drawn from (seed, epoch) (see
                  :func:`~fastdistill.training.data.epoch_batches`); a resumed run draws the epoch again and skips
                  the batches trained on, so resume is exact when the loader's order is a function of the epoch:
                  no shuffle, ``shuffle=True`` without a ``generator`` of its own, a ``DistributedSampler``
                  (random augmentation included, except what ``persistent_workers`` draw after epoch 0: their
                  streams run on across epochs, a resumed run's new workers start theirs again).
                  ``batch_size``, ``shuffle``, ``drop_last`` and ``collate_fn`` of the loop do not apply;
                - any other iterable of batches (a generator, an object with ``__iter__``): as a DataLoader. One
                  without ``len`` needs ``max_steps``; when one yields nothing more (a generator's second pass),
                  training stops there, with a warning. (A list or tuple has ``len`` and ``[i]``: a dataset of
                  items, as for a DataLoader.)

                A ``teacher_cache`` (row i = item i) needs the map-style dataset.
            eval_data / eval_fn: evaluated every ``eval_every`` steps and at the end: ``eval_fn(loop) -> {name:
                value}``, or by default :meth:`evaluate` on ``eval_data`` (loss and accuracy).
            checkpoint_every: save a checkpoint every this many steps, and at the end, under
                ``output_dir/checkpoints/step-XXXXXXXX`` (needs ``output_dir``); ``keep_checkpoints`` keeps the
                newest few with a step up to the current one (later ones, of an abandoned run, are deleted).
            resume_from: a checkpoint directory, or "latest" (the newest intact one under
                ``output_dir/checkpoints``, damaged ones skipped with a warning; start fresh when there is none).
                The same ``max_steps``/``epochs`` and data continue the run exactly, and the metrics files are cut
                back to the checkpoint's step (the steps after it run again). A checkpoint written with other run
                settings, or whose model files do not fit this loop's modules, is a one-line ValueError naming the
                file (:meth:`check_checkpoint`).

        Returns:
            ``{"step", "epoch", "train_loss", **last evaluation}``; ``train_loss`` is the last logged training loss
            (from the checkpoint when a resumed run had no step left to take), None if none was logged. A resumed
            run with no step left evaluates once more (not logged: the finished run logged it) and returns that.
        """
        counts = {"max_steps": max_steps, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                  "keep_checkpoints": keep_checkpoints}  # fmt: skip
        for name, value in counts.items():
            functional.check_int(name, value, low=1, allow_none=True)  # (2.5 steps, True, 0: never meant)
        if epochs is not None:
            functional.check_real("epochs", epochs, low=0.0, high=math.inf, low_open=True, high_open=True)
        for name, value in (("checkpoint_every", checkpoint_every), ("keep_checkpoints", keep_checkpoints)):
            if value is not None and self.output_dir is None:  # else no checkpoint is written, silently
                raise ValueError(f"{name}={value} saves under output_dir/checkpoints, and this loop has no "
                                 "output_dir: give DistillationLoop(output_dir=...)")  # fmt: skip
        batches = batch_iterable(train_data)  # None: a map-style dataset, batched here
        per_epoch = self._epoch_length(train_data, batches)
        # in state.json: a resumed run on a dataset of another size would take another data order
        self._data_size = len(train_data) if batches is None else None
        if max_steps is None and epochs is None:
            raise ValueError("give max_steps or epochs")
        if epochs is not None and per_epoch is None:
            raise ValueError(f"epochs needs the number of batches in an epoch, and train_data "
                             f"({type(train_data).__name__}) has no len(): give max_steps")  # fmt: skip
        budget = math.inf if epochs is None else int(round(epochs * per_epoch))  # micro-batches
        by_epochs = math.ceil(budget / self.grad_accum_steps) if epochs is not None else math.inf
        total_steps = int(min(max_steps if max_steps is not None else math.inf, by_epochs))
        if total_steps == 0:
            raise ValueError(f"epochs={epochs} of {per_epoch} micro-batches rounds to 0 micro-batches: nothing to "
                             "train; give more epochs (or max_steps)")  # fmt: skip
        if self.scheduler is None and self._scheduler_arg is not None:
            self._build_scheduler(total_steps)
        self._perm, self._perm_epoch = None, -1
        self._batches, self._batches_epoch = iter(()), -1

        resume_dir = self._checkpointer.find(resume_from) if resume_from is not None else None
        if resume_dir is not None:
            self.load_checkpoint(resume_dir)
            if self.step > total_steps:  # (== total: a finished run, resumed to report it)
                warnings.warn(f"resumed at step {self.step} from {resume_dir}, past this fit's {total_steps} steps "
                              f"(max_steps={max_steps}, epochs={epochs}): nothing is trained; the model is the "
                              "checkpoint's", stacklevel=2)  # fmt: skip
        elif self.step == 0:  # a fresh run; a second fit() on this loop just continues
            seed_everything(self.seed + self.rank)
        elif self.step >= total_steps:  # a second fit(max_steps=n): n counts from the run's start, not from here
            warnings.warn(f"this loop is at step {self.step} and this fit's steps end at {total_steps} (max_steps="
                          f"{max_steps}, epochs={epochs}: counted from the run's start): nothing is trained; give "
                          f"max_steps > {self.step} to train on", stacklevel=2)  # fmt: skip
        if resume_from is not None:  # the steps after the checkpoint run again: drop what a crash left of them
            self._metrics.truncate(self.step)
        for m in (self.student, *self._extra_modules):
            m.train()

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=self.step, disable=not self.progress or self.rank != 0,
                   desc="distill", dynamic_ncols=True)  # fmt: skip
        first_step = self.step
        if not self._window_restored:  # a fresh run or a second fit(): a new logging window
            self._window, self._window_steps = {}, 0
        self._window_restored = False
        last_eval: dict[str, float] = {}
        evaluated_at = saved_at = None
        t0 = time.perf_counter()
        evaluate = eval_fn is not None or eval_data is not None

        def evaluation() -> dict[str, float]:
            return eval_fn(self) if eval_fn is not None else self._default_eval(eval_data)

        def end_of_step(final: bool) -> None:
            """Log, evaluate and checkpoint where due at this step; each of them at the last step."""
            nonlocal t0, last_eval, evaluated_at, saved_at
            if self._window_steps and (self.step % self.log_every == 0 or final):
                record = self._reduce_window(self._window, self._window_steps)
                record["lr"] = self._step_lr  # the last step's rate: the scheduler has moved on to the next
                ran = min(self._window_steps, self.step - first_step)  # a restored window's steps ran before
                record["steps_per_s"] = ran / max(time.perf_counter() - t0, 1e-9)
                self.last_train_loss = record["loss"]
                self.log("train", record)
                bar.set_postfix(loss=f"{self.last_train_loss:.4f}")
                self._window, self._window_steps, t0 = {}, 0, time.perf_counter()
            if evaluate and ((eval_every and self.step % eval_every == 0) or final) and evaluated_at != self.step:
                last_eval = evaluation()
                self.log("eval", dict(last_eval))
                evaluated_at = self.step
            save = self.output_dir is not None and checkpoint_every
            if save and (self.step % checkpoint_every == 0 or final) and saved_at != self.step:
                self.save_checkpoint(keep=keep_checkpoints)
                saved_at = self.step

        try:
            while self.step < total_steps:
                micro = self._micro_batches(train_data, batches, per_epoch, budget)
                if not micro:  # an iterable of batches without len has run out
                    if self.step == first_step:
                        raise ValueError(f"train_data yields no batch (epoch {self.epoch}, after {self.batch_in_epoch} "
                                         "batches)")  # fmt: skip
                    warnings.warn(f"train_data ran out at step {self.step} of {total_steps} (an iterable that yields "
                                  f"no more batches): training stops here", stacklevel=2)  # fmt: skip
                    end_of_step(final=True)
                    break
                set_progress = getattr(self.loss_fn, "set_progress", None)
                if set_progress is not None:  # scheduled losses (e.g. a decaying soft-label weight)
                    set_progress(self.step, total_steps)
                sums = self._train_step(micro)
                self.step += 1
                bar.update(1)
                for k, v in sums.items():
                    self._window[k] = self._window.get(k, 0) + v
                self._window_steps += 1
                end_of_step(final=self.step == total_steps)
        finally:
            # the epoch's iterator (a DataLoader's workers) ends with fit(): a next fit() draws the epoch again, as a
            # resumed run does
            if hasattr(self._batches, "close"):  # (it leaves an iterator of the caller's open: epoch_batches)
                self._batches.close()
            self._batches, self._batches_epoch = iter(()), -1
            bar.close()
        if self.step == first_step and evaluate:
            # resumed from the last step's checkpoint: nothing ran, and the final evaluation is the finished run's
            # (its record is in the logs already, so it is returned, not logged twice)
            last_eval = evaluation()
        return {"step": self.step, "epoch": self._epochs_done(per_epoch), "train_loss": self.last_train_loss,
                **last_eval}  # fmt: skip

    def _build_scheduler(self, total_steps: int) -> None:
        """Build the scheduler from the callable ``scheduler``; with the state of a checkpoint loaded before (by
        :meth:`load_checkpoint`, when there was no scheduler yet to load it into) restored."""
        pending, self._pending_scheduler_state = self._pending_scheduler_state, None
        # a scheduler's constructor sets the groups' lr (and momentum, ...) to its step-0 values: keep the
        # checkpoint's, which the optimizer holds now
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.scheduler = self._scheduler_arg(self.optimizer, total_steps)
        if pending is not None:
            self.scheduler.load_state_dict(pending)
            for g, saved in zip(self.optimizer.param_groups, groups):
                g.update(saved)

    def _epoch_length(self, train_data: Data, batches: Iterable | None) -> int | None:
        """Micro-batches in an epoch of ``train_data`` (None: an iterable without len), checked to be > 0 and to
        fit the loop's settings."""
        if batches is None:
            n = len(train_data)
            if self.teacher_cache is not None:  # before the first step, not an IndexError (or wrong rows) mid-run
                self.teacher_cache.check_length(n)
            per_epoch = self.batches_per_epoch(n)
            if per_epoch == 0:
                raise ValueError(f"the dataset ({n} items) holds no full micro-batch of {self.batch_size} x "
                                 f"{self.world_size} processes with drop_last={self.drop_last}")  # fmt: skip
            rest = n % (self.batch_size * self.world_size)
            if rest and not self.drop_last and rest < self.world_size and self.rank == 0:
                warnings.warn(f"the last {rest} item(s) of each epoch ({n} items, {self.batch_size} x "
                              f"{self.world_size} processes per micro-batch) are dropped although drop_last=False: "
                              "fewer than one per process (DDP needs every process to take part); one process "
                              "with the same global batch trains on them", stacklevel=3)  # fmt: skip
            return per_epoch
        if self.teacher_cache is not None:
            raise ValueError(f"a teacher_cache is read by dataset index (row i = item i): give fit() the map-style "
                             f"dataset, not a {type(train_data).__name__} of batches")  # fmt: skip
        unsharded = isinstance(batches, DataLoader) and not _sharded(batches)
        if self.world_size > 1 and unsharded:
            warnings.warn("every process iterates its own DataLoader: without a DistributedSampler, each trains on "
                          "the same batches", stacklevel=3)  # fmt: skip
        try:
            per_epoch = len(batches)
        except TypeError:  # a generator, or a DataLoader over an IterableDataset without len
            return None
        if per_epoch == 0:
            raise ValueError(f"train_data ({type(train_data).__name__}) holds no batch")
        return per_epoch

    def _micro_batches(
        self, train_data: Data, batches: Iterable | None, per_epoch: int | None, budget: float
    ) -> list[tuple[Tensor | None, Batch]]:
        """The next optimizer step's micro-batches on this device, each with its dataset indices (None for
        ``batches``); fewer at the end of an ``epochs`` budget or when ``batches`` runs out. Advances the
        position."""
        n_micro = self.grad_accum_steps
        if budget != math.inf:
            n_micro = int(min(n_micro, budget - (self.epoch * per_epoch + self.batch_in_epoch)))
        micro = []
        for _ in range(n_micro):
            if batches is None:
                index = self._next_indices(len(train_data))
                raw = collate(train_data, index.tolist(), self.collate_fn)
            else:
                index, raw = None, self._next_batch(batches, per_epoch)
                if raw is _END:
                    break
            micro.append((index, self._on_device(self._with_mask_labels(split_batch(raw)))))
        return micro

    def _with_mask_labels(self, batch: Batch) -> Batch:
        """``batch``, or, without labels, for a causal LM whose loss reads labels for nothing but which positions
        count (:func:`_labels_only_skip`; from teachers or a cache), with its ``attention_mask`` [B, T] as labels
        that only mask (:func:`~fastdistill.training.data.mask_labels`, as ``DistillationTrainer`` does): padding
        then carries no loss and is not counted."""
        mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, Mapping) else None
        if (batch.labels is not None or not isinstance(mask, Tensor) or mask.dim() != 2 or self.shift_labels is not True
                or not _labels_only_skip(self.loss_fn)
                or not (self.teachers or self.teacher_cache is not None)):  # fmt: skip
            return batch
        return Batch(batch.inputs, mask_labels(mask, self.ignore_index), batch.sample_weight, labels_from_mask=True)

    def _on_device(self, batch: Batch) -> Batch:
        """``batch`` on the loop's device, its labels and sample weights checked first where they still are on the
        host (``Batch.min_vocab``), for a loss of ours that checks them on the device otherwise (a sync per
        micro-batch)."""
        vocab = host_checked(batch, self.loss_fn.ignore_index) if self._own_loss else None
        moved = (_to_device(x, self.device) for x in (batch.inputs, batch.labels, batch.sample_weight))
        return Batch(*moved, vocab, batch.labels_from_mask)

    def _next_batch(self, batches: Iterable, per_epoch: int | None) -> Any:
        """The next batch of ``batches`` (``_END`` once it has run out: a new epoch without a batch); advances the
        position, into the next epoch when one ends (after ``per_epoch`` batches, or when the iterator stops)."""
        for _ in range(2):  # at most one epoch boundary per batch
            if per_epoch is not None and self.batch_in_epoch >= per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self._batches_epoch != self.epoch:  # a resumed run skips what its epoch has trained on
                self._batches = epoch_batches(batches, self.seed, self.epoch, skip=self.batch_in_epoch)
                self._batches_epoch = self.epoch
            batch = next(self._batches, _END)
            if batch is not _END:
                self.batch_in_epoch += 1
                return batch
            if self.batch_in_epoch == 0:
                break
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return _END

    def _default_eval(self, data: Data) -> dict[str, float]:
        """The student's metrics; with trained teachers (co-training) also each teacher's, as ``teacher{k}/...``."""
        out = self.evaluate(data)
        if self.train_teachers:
            for k, t in enumerate(self.teachers):
                out.update({f"teacher{k}/{name}": v for name, v in self.evaluate(data, model=t).items()})
        return out

    def epoch_float(self, n: int) -> float:
        """Epochs done, fractional, over a dataset of ``n`` items."""
        return self._epochs_done(self.batches_per_epoch(n))

    def _epochs_done(self, per_epoch: int | None) -> float:
        return self.epoch + (self.batch_in_epoch / max(per_epoch, 1) if per_epoch is not None else 0.0)

    def _reduce_window(self, window: dict[str, Tensor], steps: int) -> dict[str, float]:
        keys = sorted(window)
        vec = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=self.device) for k in keys])
        if self.world_size > 1:
            dist.all_reduce(vec)
            # the loss carried a factor world_size (see _micro_loss); items are summed already; the rest averaged
            vec = vec / self.world_size
        # (items: every process holds the global count, so the average is that count)
        return {k: float(v) / steps for k, v in zip(keys, vec.tolist())}

    @torch.no_grad()
    def evaluate(self, data: Data, batch_size: int | None = None, model: nn.Module | None = None) -> dict[str, float]:
        """Cross-entropy (``loss``) and top-1 ``accuracy`` of ``model`` (default: the student) over the labelled
        items of ``data`` (a map-style dataset, batched by ``batch_size`` (default the loop's), or a DataLoader /
        iterable of batches, as in :meth:`fit`) after the causal shift when there is one, in eval mode; the training
        mode is restored after. Data with no labelled item (empty, a spent generator) is a ValueError.

        Under torchrun each process evaluates what ``data`` yields to it: a map-style dataset or another iterable is
        evaluated whole on every process (each reports the metrics of all of it); a DataLoader whose sampler (or
        batch sampler's sampler) is a ``DistributedSampler`` yields this process's shard, and the sums (loss,
        correct, count) are all-reduced, so every process reports the metrics of all the shards (with the few
        items a ``DistributedSampler`` without ``drop_last`` repeats to even them out counted twice). Every process
        must call it then (they meet at the all-reduce)."""
        model = self.student if model is None else model
        was_training = model.training
        model.eval()
        total_ce, correct, count = 0.0, 0, 0
        for raw in self._eval_batches(data, batch_size or self.batch_size):
            b = split_batch(_to_device(raw, self.device))
            if b.labels is None:
                raise ValueError("evaluate() needs labelled items")
            with self._autocast():
                logits = self.forward(model, b.inputs)
            labels = b.labels
            if self._shifts(labels, logits):  # the labels move: a [..., :-1, :] slice of the logits is no [N, V] view
                labels = pad_last_position(labels[..., 1:], self.ignore_index)
            flat, lab, _ = self._hard_rows(logits, labels, None, "evaluate's cross-entropy")
            rows = (lab != self.ignore_index).nonzero().squeeze(1)
            sums = torch.zeros(2, dtype=torch.float64, device=flat.device)  # read once per batch (a sync)
            for part in rows.split(max(1, _EVAL_CHUNK_ELEMENTS // flat.shape[-1])):  # float32 copies of a few rows
                x, y = flat[part].float(), lab[part]
                sums[0] += F.cross_entropy(x, y, reduction="sum")
                sums[1] += (x.argmax(-1) == y).sum()
            ce, right = sums.tolist()
            total_ce, correct, count = total_ce + ce, correct + int(right), count + rows.numel()
        model.train(was_training)
        if self.world_size > 1 and _sharded(data):  # each process saw its shard: report the global metrics
            sums = torch.tensor([total_ce, correct, count], dtype=torch.float64, device=self.device)
            dist.all_reduce(sums)  # before the count check: a process with an empty shard must still join
            total_ce, correct, count = sums[0].item(), int(sums[1].item()), int(sums[2].item())
        if count == 0:  # 0.0 would read as a perfect loss
            raise ValueError("evaluate(): eval_data yielded no labelled item (an empty dataset, a generator already "
                             "iterated, or every label equal to ignore_index); give a dataset or DataLoader that "
                             "can be iterated again")  # fmt: skip
        return {"loss": total_ce / count, "accuracy": correct / count}

    def _eval_batches(self, data: Data, batch_size: int) -> Iterable:
        """The batches of ``data``: a DataLoader / iterable of batches as it is, a map-style dataset in order."""
        batches = batch_iterable(data)
        if batches is not None:
            return batches
        return (collate(data, range(start, min(len(data), start + batch_size)), self.collate_fn)
                for start in range(0, len(data), batch_size))  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------
    # logs and checkpoints: a MetricsLogger (metrics.py) and a Checkpointer (checkpoint.py) do the work

    def log(self, split: str, metrics: dict[str, float]) -> None:
        """Record metrics at the current step: in :attr:`history`, and on rank 0 in ``metrics.jsonl``,
        ``metrics.csv`` (long format: step, epoch, split, name, value) and TensorBoard."""
        self._metrics.log(split, metrics, step=self.step, epoch=self.epoch)

    def _run_state(self) -> dict[str, Any]:
        """A checkpoint's ``state.json``: the position in the data, the settings that fix a step and the data order
        (:data:`~fastdistill.training.checkpoint.RUN_KEYS`), and the last logged training loss."""
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
            "shuffle": self.shuffle, "drop_last": self.drop_last, "grad_accum_steps": self.grad_accum_steps,
            "train_loss": self.last_train_loss, "log_window": self._window_saved, "data_size": self._data_size,
        }  # fmt: skip

    def _restore_position(self, state: dict[str, Any]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.last_train_loss = state.get("train_loss")  # absent from checkpoints of older versions
        saved = state.get("log_window") or {"sums": {}, "steps": 0}
        self._window, self._window_steps = dict(saved["sums"]), saved["steps"]
        self._window_restored = True

    def save_checkpoint(self, directory: str | os.PathLike | None = None, keep: int | None = None) -> Path:
        """Save everything needed to continue exactly; default directory ``output_dir/checkpoints/step-XXXXXXXX``.
        Models: ``<name>.safetensors``; optimizer, scheduler, RNG (one file per process): safetensors + JSON;
        ``state.json``: step, position in the data and the settings that fix the data order. ``keep``: delete all
        but the newest ``keep`` checkpoints beside it with a step up to this one (it is always kept). Every process
        must call it."""
        functional.check_int("keep", keep, low=1, allow_none=True)  # (as fit's keep_checkpoints: 0 is not "all")
        self._window_saved = self._saved_window()
        try:
            return self._checkpointer.save(directory, keep)
        finally:
            self._window_saved = None

    def _saved_window(self) -> dict[str, Any]:
        """The logging window as ``state.json`` holds it: ``{"sums": {part: float}, "steps": n}``, the sums
        averaged over processes (the mean of each process's window restored on every process keeps the next
        log's average). A float32 sum is exact as a float, so the resumed log is the same number."""
        keys = sorted(self._window)
        if self.world_size > 1 and keys:  # every process saves: all of them join
            vec = torch.stack([torch.as_tensor(self._window[k], dtype=torch.float64, device=self.device)
                               for k in keys])  # fmt: skip
            dist.all_reduce(vec)
            sums = dict(zip(keys, (vec / self.world_size).tolist()))
        else:
            sums = {k: float(self._window[k]) for k in keys}
        return {"sums": sums, "steps": self._window_steps}

    def check_checkpoint(self, directory: str | os.PathLike) -> dict[str, Any]:
        """A one-line :class:`ValueError` naming the file unless ``directory`` is a checkpoint this loop can continue
        from: written with the same run settings (batch size, accumulation, seed, data order, process count), every
        file intact, and each model file fitting this loop's module (keys and shapes, from the headers: a
        checkpoint of another model names the module, the keys that differ or the first shape that does). Reads no
        tensor; returns ``state.json``."""
        return self._checkpointer.check(directory)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore what :meth:`save_checkpoint` wrote (into this loop's existing modules/optimizer/scheduler),
        after :meth:`check_checkpoint`: a checkpoint that does not fit fails without half-restoring this loop. With
        ``scheduler=`` a callable not built yet, the scheduler's state is kept until :meth:`fit` builds it."""
        pending = None
        if self.scheduler is None and self._scheduler_arg is not None and (Path(directory) / "scheduler.json").exists():
            pending = ckpt.load_state(directory, "scheduler")  # read first: a damaged file restores nothing
        self._checkpointer.load(directory)
        self._pending_scheduler_state = pending

    def close(self) -> None:
        """Remove the feature hooks and close the TensorBoard writer. (A loop that is dropped without it removes its
        hooks when collected.)"""
        _remove_hooks(self._hooks)
        self._metrics.close()


def _remove_hooks(hooks: list) -> None:
    for h in hooks:
        h.remove()
    hooks.clear()


def _sharded(data: Any) -> bool:
    """Whether ``data`` is a DataLoader that yields one process's shard: its sampler, or its batch sampler's
    sampler, is a ``DistributedSampler``."""
    if not isinstance(data, DataLoader):
        return False
    samplers = (data.sampler, getattr(data.batch_sampler, "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_world_size() -> int:
    """torchrun's ``WORLD_SIZE`` (1 when unset or not an integer: init_distributed / the launcher name that)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _own_loss(loss: Any) -> bool:
    """``loss`` is one of fastdistill's losses the loop calls with ``num_items`` (class attribute
    ``values_as_kd_loss``: KDLoss, CodistillLoss and the methods' WeightedKDLoss, SLaMLoss, WeakTeacherKDLoss, or a
    subclass of one): their checks of ``num_items``, the labels and the sample weights are kd_loss's (labels in
    [0, V) or ignore_index; weights finite and >= 0), which the loop's own count and its host-side check
    (``host_checked``) already guarantee. (An attribute, not an isinstance check: training does not import methods.)"""
    return bool(getattr(type(loss), "values_as_kd_loss", False))


def process_device(device: torch.device | str | None) -> torch.device:
    """This process's device under torchrun: ``device``, except None or ``"cuda"`` without an index, which are
    :func:`default_device` (cuda:LOCAL_RANK where CUDA is available)."""
    d = torch.device(device) if device is not None else None
    return default_device() if d is None or (d.type == "cuda" and d.index is None) else d


def default_device() -> torch.device:
    """The CUDA device of this process's local rank when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` ("auto", "bf16", "off") on ``device``: bf16 or None. An explicit "bf16" that
    cannot run there is a ValueError, not a silent float32 run."""
    if amp not in ("auto", "bf16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {amp!r}")
    supported = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if amp == "bf16" and not supported:
        where = "this CUDA device does not support bf16" if device.type == "cuda" else f"the device is {device}"
        raise ValueError(f"amp='bf16' autocasts on a CUDA device with bf16 support only ({where}); use 'auto' or "
                         "'off'")  # fmt: skip
    return torch.bfloat16 if supported and amp != "off" else None


def _skips_ignored_positions(loss: Any) -> bool:
    """Whether every term of ``loss`` is 0 at a position whose label is ``ignore_index``, so that the causal shift
    may move the labels instead of cutting the logits: our losses (their classes say so), not a subclass of one
    (whose forward may add a term of its own)."""
    return bool(type(loss).__dict__.get("skips_ignored_positions", False))


def _labels_only_skip(loss: Any) -> bool:
    """Whether ``loss`` reads its labels only for which positions to skip (its class's ``labels_only_skip``: KDLoss
    with ce_weight 0, CodistillLoss and WeakTeacherKDLoss with hard_weight 0, WeightedKDLoss, SLaMLoss); not a
    subclass of one (whose forward may read the labels otherwise), as :func:`_skips_ignored_positions`."""
    method = type(loss).__dict__.get("labels_only_skip")
    return method is not None and bool(method(loss))


def _positions_shape(x: Tensor | Any) -> torch.Size:
    """The leading ``[B, T]`` (or ``[B]``) of logits ``[..., V]`` or of a TeacherHead's hidden ``[..., H]``."""
    return (x.hidden if hasattr(x, "hidden") else x).shape[:-1]


def _positions_dim(x: Tensor | Any) -> int:
    """Dimensions of logits ``[B, T, V]`` (3) or ``[B, V]`` (2), or of a TeacherHead's hidden states."""
    return len(_positions_shape(x)) + 1


def _shape(x: Any) -> str:
    if x is None:
        return "None"
    return f"{list(x.hidden.shape)} (hidden states)" if hasattr(x, "hidden") else str(list(x.shape))


def _is_scheduler(x: Any) -> bool:
    return x is not None and hasattr(x, "step") and hasattr(x, "state_dict")


def _check_fused_linear(student: nn.Module, teachers: Sequence[nn.Module], loss: Any, train_teachers: bool,
                        forward: Any) -> None:  # fmt: skip
    """What ``fused_linear=True`` needs, checked before training: a KDLoss, frozen teachers, no forward= (the
    loop reads the hidden states itself), and models whose logits are their head applied to the last hidden
    states (:func:`fastdistill.fused_linear.check_fusable`)."""
    if not isinstance(loss, KDLoss):
        raise ValueError(f"fused_linear=True computes a KDLoss from hidden states and heads; loss must be 'kd' or a "
                         f"KDLoss, got {type(loss).__name__}")  # fmt: skip
    if train_teachers:
        raise ValueError("fused_linear=True gives the teachers no gradient: not with train_teachers=True")
    if forward is not None:
        raise ValueError("fused_linear=True reads the models' hidden states itself: not with forward=")
    for name, model in [("student", student), *((f"teachers[{k}]", t) for k, t in enumerate(teachers))]:
        check_fusable(name, model)
