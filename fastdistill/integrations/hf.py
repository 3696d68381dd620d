"""Hugging Face ``transformers``: :class:`DistillationTrainer`, a ``Trainer`` whose loss is ``fastdistill.kd_loss``,
and :class:`DistillationArguments`, ``TrainingArguments`` with the KD settings.

The trainer subclasses :class:`transformers.Trainer` and overrides three public methods (no monkey-patching):

- ``compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)``: student forward, K teacher
  forwards under ``no_grad`` and the student's autocast (``use_cache=False``), the causal shift for causal LMs,
  then ``kd_loss`` (``labels`` give the hard-label cross-entropy and the ``ignore_index`` mask) normalised by
  ``num_items_in_batch``;
- ``get_batch_samples``: counts ``num_items_in_batch`` as the loss sees the labels (after the shift, with this
  trainer's ``ignore_index``), summed over the accumulated micro-batches and, with
  ``average_tokens_across_devices``, over processes. HF's own count skips the shift for some causal LMs;
- ``prediction_step``: as Trainer's, but unlabelled evaluation data (pure KD) still reports ``eval_loss``.

Example::

    args = DistillationArguments(output_dir="out", temperature=2.0, ce_weight=0.1, ensemble="prob_mean")
    trainer = DistillationTrainer(model=student, args=args, teachers=[teacher_a, teacher_b], train_dataset=ds)
    trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_pt_utils import nested_detach
from transformers.utils import logging

from .. import functional
from ..fused_linear import (
    LoRATerm,
    TeacherHead,
    check_fusable,
    check_head_output,
    fused_linear_kd_loss,
    head_logits,
    hidden_and_head,
)
from ..training.data import (
    detect_causal_lm,
    logits_of,
    mask_labels,
    model_list,
    pad_last_position,
    shift_positions,
    unwrap_model,
)

logger = logging.get_logger(__name__)
# dataset columns the loss reads, not the student's forward: kept through remove_unused_columns, taken out of its inputs
LOSS_COLUMNS = ("shift_labels", "sample_weight")

# The KD settings, in DistillationArguments and as DistillationTrainer keywords (same names, same defaults).
KD_SETTINGS = ("divergence", "temperature", "scale_by_temperature_sq", "ensemble", "teacher_weights", "beta", "skew",
               "ce_weight", "ignore_index", "backend", "shift_labels", "fused_linear")  # fmt: skip


@dataclass
class DistillationArguments(TrainingArguments):
    """``TrainingArguments`` plus the KD settings of :class:`DistillationTrainer` (as TRL's ``GKDConfig`` extends
    ``SFTConfig``), so that ``HfArgumentParser(DistillationArguments)`` reads them from the command line
    (``--temperature 4 --teacher_weights 0.7 0.3 --shift_labels true``) and the trainer saves them with the other
    arguments (``training_args.bin``, ``args.to_dict()``, the loggers' hyper-parameters). They are validated when
    the object is built, by :func:`fastdistill.functional.check_hyperparameters` as in :func:`fastdistill.kd_loss`.

    Fields (defaults as ``kd_loss``): ``divergence``, ``temperature``, ``scale_by_temperature_sq``, ``ensemble``,
    ``teacher_weights`` (one number per teacher, or None for uniform), ``beta``, ``skew``, ``ce_weight``,
    ``ignore_index``, ``backend``, ``shift_labels`` (None: on for causal LMs), and ``fused_linear`` (False: see
    :class:`DistillationTrainer`).

    Coming from TRL's ``GKDConfig`` (``trl.experimental.gkd``; read in its source, not run here):

    - ``beta``: the same generalized JSD for ``0 < beta < 1``: mixture ``M = beta * teacher + (1 - beta) * student``,
      loss ``beta * KL(teacher || M) + (1 - beta) * KL(student || M)``; use ``divergence="jsd"``. TRL's ``beta=0``
      and ``beta=1`` mean forward and reverse KL: here ``divergence="kl"`` and ``divergence="reverse_kl"``.
    - ``temperature``: GKDConfig's (default 0.9) is the sampling temperature of on-policy generation; its default
      loss divides the logits by nothing (T = 1), its Liger loss (``use_liger_kernel=True``) by that temperature.
      Here ``temperature`` divides both logits in the loss, and the
      divergence is multiplied by T**2 unless ``scale_by_temperature_sq=False``; TRL does not scale by T**2.
    - ``lmbda``, ``max_new_tokens``, ``seq_kd`` (on-policy / sequence-level KD) have no counterpart: this trainer
      distills on the dataset's sequences. ``teacher_model_name_or_path``: pass the loaded model as ``teachers=[m]``
      or ``teacher_model=m``. GKD's loss has no hard-label term: ``ce_weight=0`` (the default).
    """

    divergence: str = field(default="kl", metadata={"help": "kl, reverse_kl, jsd, tvd, skew_kl or skew_reverse_kl"})
    temperature: float = field(default=1.0, metadata={"help": "T > 0, divides student and teacher logits"})
    scale_by_temperature_sq: bool = field(default=True, metadata={"help": "multiply the divergence by T**2"})
    ensemble: str = field(default="prob_mean", metadata={"help": "prob_mean, logit_mean or loss_mean (K > 1)"})
    teacher_weights: list[float] | None = field(default=None, metadata={"help": "one weight per teacher"})
    beta: float = field(default=0.5, metadata={"help": "jsd: weight of the teacher in the mixture, in (0, 1)"})
    skew: float = field(default=0.1, metadata={"help": "skew_kl / skew_reverse_kl mixing weight, in [0, 1)"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of the hard-label cross-entropy, in [0, 1]"})
    ignore_index: int = field(default=-100, metadata={"help": "label of positions without loss"})
    backend: str = field(default="auto", metadata={"help": "auto, cpu, cuda, triton or reference"})
    shift_labels: bool | None = field(default=None, metadata={"help": "t vs label t+1; default: on for causal LMs"})
    fused_linear: bool = field(default=False, metadata={
        "help": "the loss from the models' last hidden states and output heads, chunk by chunk "
                "(fastdistill.fused_linear_kd_loss): the [B, T, V] logits are never materialised"})  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_weights is not None:
            self.teacher_weights = _weight_list(self.teacher_weights)  # JSON-serialisable, whatever was given
        _check_settings(self.kd_settings())

    def kd_settings(self) -> dict[str, Any]:
        """The KD fields, by name (:data:`KD_SETTINGS`)."""
        return {name: getattr(self, name) for name in KD_SETTINGS}


KD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(DistillationArguments) if f.name in KD_SETTINGS}


def _weight_list(weights: Tensor | Sequence[float]) -> list[float]:
    """Teacher weights as a list of floats (the trainer's are per teacher, constant over rows: 1-D)."""
    try:
        if isinstance(weights, (str, bytes)):  # "0.7 0.3" or "ab": torch's message would name neither
            raise TypeError
        weights = torch.as_tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"teacher_weights must be a list of numbers, one per teacher (--teacher_weights 0.7 0.3), "
                        f"got {weights!r}") from None
    if weights.dim() != 1:
        raise ValueError(f"teacher_weights must hold one number per teacher, got shape {tuple(weights.shape)}")
    return weights.tolist()


def _check_settings(settings: dict[str, Any]) -> None:
    """Validate KD settings as ``kd_loss`` does, before any training step."""
    functional.check_hyperparameters(reduction="mean", **{
        k: v for k, v in settings.items() if k not in ("teacher_weights", "shift_labels", "fused_linear")})
    if settings["shift_labels"] is not None and not isinstance(settings["shift_labels"], bool):
        raise TypeError(f"shift_labels must be None or a bool, got {type(settings['shift_labels']).__name__}")
    if not isinstance(settings["fused_linear"], bool):
        raise TypeError(f"fused_linear must be a bool, got {type(settings['fused_linear']).__name__}")
    functional.check_teacher_weights(settings["teacher_weights"])  # finite, >= 0, not all 0 (the length: below)


def _kd_settings(args: TrainingArguments, given: dict[str, Any], num_teachers: int) -> dict[str, Any]:
    """The trainer's KD settings: ``args``' fields when it is a :class:`DistillationArguments` (else the defaults),
    then the keywords ``given`` (None = not given). With DistillationArguments a keyword may only repeat args'
    value: one that differs raises, so that a setting never has two sources that disagree."""
    from_args = isinstance(args, DistillationArguments)
    settings = args.kd_settings() if from_args else dict(KD_DEFAULTS)
    for name, value in given.items():
        if value is None:
            continue
        if name == "teacher_weights":
            value = _weight_list(value)
        if from_args and value != settings[name]:
            raise ValueError(
                f"DistillationTrainer got {name}={value!r} but args.{name}={settings[name]!r}: with "
                f"DistillationArguments, set the KD settings there (a keyword may only repeat them)"
            )
        settings[name] = value
    _check_settings(settings)
    weights = settings["teacher_weights"]
    if weights is not None and len(weights) != num_teachers:
        raise ValueError(f"teacher_weights has {len(weights)} numbers for {num_teachers} teachers")
    return settings


def _teacher_list(teachers: Sequence[nn.Module] | None, teacher_model: nn.Module | None) -> list[nn.Module]:
    """``teachers``, or ``[teacher_model]`` (TRL's keyword for one teacher): a non-empty list of modules."""
    if teachers is not None and teacher_model is not None:
        raise ValueError("pass teachers=[...] or teacher_model=..., not both")
    if teacher_model is not None:
        teachers = [teacher_model]
    if teachers is None:
        raise ValueError("DistillationTrainer needs at least one teacher (teachers=[...] or teacher_model=...)")
    teachers = model_list(teachers)  # (a generator read once: not consumed by a check first)
    if not teachers:
        raise ValueError("DistillationTrainer needs at least one teacher (teachers=[...] or teacher_model=...)")
    return teachers


# Trainer.__init__'s keywords: anything else given to DistillationTrainer is a mistake to name (Trainer's own
# TypeError would not say where teachers and KD settings go).
_TRAINER_KEYWORDS = frozenset(inspect.signature(Trainer.__init__).parameters) - {"self"}


def _fsdp2_shard(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Shard a frozen ``teacher`` with FSDP2 over the student's mesh, with the student's mixed-precision, offload
    and resharding policies: one unit per teacher layer (the classes in its ``_no_split_modules``), the rest in the
    root. Not accelerate's ``fsdp2_prepare_model``: that sets the shared plugin's wrap policy from the model it is
    given, and the student would then be wrapped by the teacher's layer classes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    kwargs = dict(
        reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload,
        mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        mesh=mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    )  # fmt: skip
    layers = set(getattr(teacher, "_no_split_modules", None) or ())
    for module in list(teacher.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher


def _zero3_engine(teacher: nn.Module, ds_config: dict[str, Any]) -> nn.Module:
    """``teacher`` in a DeepSpeed ZeRO-3 inference engine, its parameters partitioned over the processes like the
    student's. The config is the training one without optimizer and scheduler (the "ZeRO Inference" setup of HF's
    DeepSpeed guide; an optimizer would allocate fp32 copies of frozen weights), its hidden-size "auto" values
    filled from the teacher's config as accelerate fills the student's. Untested here (DeepSpeed is not installed
    in CI); TRL's ``prepare_deepspeed`` takes the same route."""
    import deepspeed

    config = {k: v for k, v in copy.deepcopy(ds_config).items() if k not in ("optimizer", "scheduler")}
    zero = config["zero_optimization"]
    h = getattr(getattr(teacher, "config", None), "hidden_size", None)
    sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h} if h else {}  # fmt: skip
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]  # DeepSpeed's default
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine


def _placed_by_loader(model: nn.Module) -> bool:
    """Whether ``from_pretrained`` placed ``model`` itself: a ``device_map`` (dispatched over devices, or offloaded
    to CPU / disk) or a quantised model (bitsandbytes and the like), which ``.to(device)`` would break or refuse."""
    return bool(getattr(model, "hf_device_map", None) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False)
                or getattr(model, "quantization_method", None) is not None)  # fmt: skip


def _on_device(x: Tensor | TeacherHead, device: torch.device, heads: dict[int, Tensor] | None = None,
               name: str = "teacher") -> Tensor | TeacherHead:  # fmt: skip
    """A teacher's logits (or hidden states and head) on the student's ``device``: a ``device_map`` teacher's last
    layer may sit elsewhere. Non-blocking, except into host memory (the CPU would read the copy before it lands).
    A head's weight, bias and LoRA terms (frozen parameters) are copied once and kept in ``heads`` (by the
    parameter's id), not on every step; a tensor formed per call (a LoRA head's bias with adapter biases,
    :func:`fastdistill.fused_linear.hidden_and_head`) is copied every time (its id may be a freed one's); an
    offloaded head (meta weights, loaded by accelerate's hooks in the forward) is a ValueError."""
    if isinstance(x, TeacherHead):
        for p in (x.weight, x.bias, *(m for t in x.lora for m in (t.a, t.b))):
            if p is not None and p.device.type == "meta":
                raise ValueError(f"fused_linear: {name}'s output head is offloaded (its weight is on the meta "
                                 "device, loaded only inside the forward): fused_linear reads the head itself; "
                                 "place the head on a GPU (device_map) or use fused_linear=False")  # fmt: skip

        def param(p: Tensor | None) -> Tensor | None:
            if p is None or p.device == device or heads is None or not isinstance(p, nn.Parameter):
                return None if p is None else _on_device(p, device)
            if id(p) not in heads:
                heads[id(p)] = p.detach().to(device)
            return heads[id(p)]

        return TeacherHead(_on_device(x.hidden, device), param(x.weight), param(x.bias),
                           tuple(LoRATerm(param(t.a), param(t.b), t.scaling) for t in x.lora))
    return x if x.device == device else x.to(device, non_blocking=device.type != "cpu")


def _no_cache(teacher: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` for ``teacher``, with ``use_cache=False`` when its forward takes ``use_cache`` (the Hugging Face
    model's, looked through DDP / DeepSpeed / PEFT wrappers whose forward passes keywords on) and ``inputs`` do not
    set it: a teacher run once per batch has no use for a KV cache (with ``use_cache`` left to the config, causal LMs
    build one, [L, B, T, H] keys and values more of transient memory)."""
    if "use_cache" in inputs:
        return inputs
    inner = unwrap_model(teacher)
    try:
        named = "use_cache" in inspect.signature(inner.forward).parameters
        passed = inner is teacher or any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD
                                         for p in inspect.signature(teacher.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin, a C extension)
        return inputs
    return {**inputs, "use_cache": False} if named and passed else inputs


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distills K teachers into ``model`` with :func:`fastdistill.kd_loss`.

    Args:
        *args, **kwargs: everything ``transformers.Trainer`` takes (``model`` is the student); any other keyword
            raises a TypeError that says where teachers and KD settings go.
        teachers: K models whose logits match the student's ``[B, (T,) V]`` (same vocabulary / label set), put in
            eval mode, frozen and placed by :meth:`prepare_teacher`.
        teacher_model: one teacher, TRL's keyword (``GKDTrainer``): the same as ``teachers=[teacher_model]``; giving
            both is an error.
        divergence, temperature, scale_by_temperature_sq, ensemble, teacher_weights, beta, skew, ce_weight,
            ignore_index, backend: as in :func:`fastdistill.kd_loss` (``ce_weight`` > 0 needs ``labels``;
            ``teacher_weights``: one number per teacher). None means: from ``args`` when it is a
            :class:`DistillationArguments`, else ``kd_loss``'s default.
        shift_labels: align position t with label t+1 (student, teachers and labels alike); None: on for causal
            LMs, off for other models (:func:`~fastdistill.training.data.detect_causal_lm`); a ValueError for a
            decoder-only model whose class does not tell (a vision-language ``...ForConditionalGeneration``). A
            batch that carries ``shift_labels`` (HF's padding-free collators) is used as given, unshifted. Needs
            sequence outputs (logits ``[B, T, V]``): on a classifier's ``[B, C]`` it is a ValueError.
        fused_linear: compute the loss from the last hidden states (the base model's output, caught by a hook:
            no ``output_hidden_states`` tuple of every layer) and the output heads (``get_output_embeddings()``)
            with :func:`fastdistill.fused_linear_kd_loss`, the models asked for the logits of the last position
            only (``logits_to_keep=1``): neither the student's nor the teachers' [B, T, V] logits are materialised.
            For models whose logits are ``lm_head(base_model(...)[0])`` as is (a logit scaling, soft-capping or
            vocabulary slicing in the config raises; the first batch checks the models' last-position logits
            against their heads); heads sharded by FSDP / ZeRO-3 are not supported, nor an override of
            :meth:`teacher_logits` (a ValueError). Predictions (``compute_metrics``, ``predict``) are the full
            logits, formed for evaluation only.

    KD settings come from one place: ``args=DistillationArguments(...)`` (saved with the run), or these keywords
    with plain ``TrainingArguments``. A keyword given alongside DistillationArguments must equal args' value
    (else ValueError). Every setting is validated here, before any training step.

    The teachers receive the same inputs as the student (minus labels; an encoder-decoder student's
    ``decoder_input_ids`` built from the labels when the batch has none); override :meth:`teacher_logits` when they
    need other inputs (another tokenizer, say). Their logits are moved to the student's device.

    Without labels (pure KD, ``ce_weight=0``) positions whose ``attention_mask`` is 0 (padding) are left out of the
    loss and of its normalisation, shifted as labels would be for causal LMs (for other models when the mask lines
    up with the logits' positions); ``evaluate`` reports ``eval_loss`` on such data too.
    """

    def __init__(
        self,
        *args: Any,
        teachers: Sequence[nn.Module] | None = None,
        teacher_model: nn.Module | None = None,
        divergence: str | None = None,
        temperature: float | None = None,
        scale_by_temperature_sq: bool | None = None,
        ensemble: str | None = None,
        teacher_weights: Tensor | Sequence[float] | None = None,
        beta: float | None = None,
        skew: float | None = None,
        ce_weight: float | None = None,
        ignore_index: int | None = None,
        shift_labels: bool | None = None,
        backend: str | None = None,
        fused_linear: bool | None = None,
        **kwargs: Any,
    ) -> None:
        given = {name: value for name, value in locals().items() if name in KD_SETTINGS}  # None: not given
        unknown = sorted(set(kwargs) - _TRAINER_KEYWORDS)
        if unknown:
            raise TypeError(
                f"DistillationTrainer got unexpected keyword argument(s) {', '.join(unknown)}: teachers go in "
                f"teachers=[...] (or teacher_model= for one), KD settings are {', '.join(KD_SETTINGS)} (or "
                f"DistillationArguments), the rest is transformers.Trainer's"
            )
        teachers = _teacher_list(teachers, teacher_model)
        super().__init__(*args, **kwargs)
        settings = _kd_settings(self.args, given, len(teachers))
        # Trainer settings that change its own loss, which compute_loss replaces: refused rather than ignored
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError("DistillationTrainer computes its own loss (kd_loss): compute_loss_func would be "
                             "ignored; override compute_loss, or use transformers.Trainer")  # fmt: skip
        if getattr(self.args, "label_smoothing_factor", 0) != 0:
            raise ValueError(f"label_smoothing_factor={self.args.label_smoothing_factor} is not applied: "
                             "DistillationTrainer's hard-label term is kd_loss's cross-entropy (ce_weight), "
                             "unsmoothed; set it to 0 (the teachers' soft targets already smooth the "
                             "labels)")  # fmt: skip
        if getattr(self.args, "use_liger_kernel", False):
            raise ValueError("use_liger_kernel=True patches the student's own loss, which DistillationTrainer does "
                             "not use (kd_loss replaces it); for a loss that never forms the [N, V] logits use "
                             "fused_linear=True")  # fmt: skip
        shift_labels = settings.pop("shift_labels")
        if shift_labels is None:
            detected = detect_causal_lm(self.model)
            inner = unwrap_model(self.model)
            if detected is None and isinstance(inner, PreTrainedModel):
                raise ValueError(f"shift_labels=None: {type(inner).__name__}'s class does not tell whether its logits "
                                 "at position t predict token t+1 (a decoder-only vision- or audio-language model "
                                 "usually does: shift_labels=True) or label t (shift_labels=False); give "
                                 "shift_labels (DistillationArguments or the keyword)")  # fmt: skip
            shift_labels = detected is True
        self.shift_labels = shift_labels
        self.fused_linear: bool = settings.pop("fused_linear")
        if self.fused_linear:
            if type(self).teacher_logits is not DistillationTrainer.teacher_logits:
                raise ValueError(f"fused_linear=True reads the teachers' last hidden states and heads, never "
                                 f"teacher_logits: {type(self).__name__}.teacher_logits would be ignored; use "
                                 "fused_linear=False with it")  # fmt: skip
            for name, m in [("model", self.model), *((f"teachers[{k}]", t) for k, t in enumerate(teachers))]:
                check_fusable(name, m)
        self._heads_checked = not self.fused_linear  # check_head_output, on the first fused batch
        self._moved_heads: dict[int, Tensor] = {}  # teachers' heads copied to the student's device (_on_device)
        self._predicting = False  # in prediction_step with predictions asked for: fused_linear forms full logits
        self.kd_options = settings  # kd_loss's keywords
        self.ignore_index: int = settings["ignore_index"]
        self.teachers = [self.prepare_teacher(t) for t in teachers]
        # compute_loss divides by num_items_in_batch itself, so training_step must not divide by the number of
        # accumulation steps again; this is the flag Trainer reads for that (set when a model takes loss kwargs).
        self.model_accepts_loss_kwargs = True
        # the loss reads "labels" even when the student's forward does not take them: keep that column
        if "labels" not in self.label_names:
            self.label_names = [*self.label_names, "labels"]

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer's columns to keep (the student's forward arguments and label names), plus ``shift_labels`` and
        ``sample_weight``: dataset columns the loss reads (:meth:`compute_loss`), which ``remove_unused_columns``
        would drop."""
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            extra = [c for c in LOSS_COLUMNS if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

    def prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """``teacher`` in eval mode, frozen, and placed for this run's parallelism:

        - FSDP2: sharded over the student's mesh (:func:`_fsdp2_shard`);
        - DeepSpeed ZeRO-3: partitioned in a DeepSpeed inference engine (:func:`_zero3_engine`, untested here);
        - otherwise (one process, DDP, FSDP1, ZeRO-1/2) a full replica on this process's device: a frozen teacher
          has no gradients to synchronise.

        Not ``accelerator.prepare_model(teacher, evaluation_mode=True)`` (read in accelerate 1.15 and transformers
        5.24): it neither shards (FSDP, ZeRO-3) nor, under FSDP, moves the model, and it registers the teacher
        among the accelerator's models, after which ``Trainer.evaluate`` before ``train`` skips preparing the
        student. A teacher loaded with a ``device_map`` (over GPUs, offloaded) or quantised is left where it is, as
        ``Trainer`` leaves such a student; its logits are moved to the student's device. Override this method to
        place teachers otherwise.
        """
        teacher = teacher.eval().requires_grad_(False)
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            return _fsdp2_shard(teacher, self.accelerator).eval()
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            return _zero3_engine(teacher, self.accelerator.state.deepspeed_plugin.deepspeed_config).eval()
        if self.is_fsdp_enabled:
            logger.warning_once("FSDP1: each process holds a full copy of the teachers (FSDP2 shards them)")
        if _placed_by_loader(teacher):  # .to() would collapse a device_map, fail on offloaded or quantised weights
            return teacher
        return teacher.to(self.args.device)

    def _loss_labels(self, batch: dict[str, Any], positions: torch.Size | None = None) -> Tensor | None:
        """The labels as the loss sees them: ``shift_labels`` if given, else ``labels`` (shifted for causal LMs).
        Without either (and ``ce_weight == 0``), a 2-D ``attention_mask`` (an encoder-decoder model's
        ``decoder_attention_mask``) as labels that only mask: ``ignore_index``
        where the mask is 0, shifted like labels for causal LMs; for other models only when it has the shape
        ``positions`` of the logits without V (a classifier's ``[B, C]`` logits have no positions to mask), so that
        ``get_batch_samples`` (no ``positions``) counts unlabelled batches of causal LMs only. None otherwise."""
        if batch.get("shift_labels") is not None:
            return batch["shift_labels"]
        labels = batch.get("labels")
        if labels is not None:
            return labels[..., 1:] if self.shift_labels else labels
        # the positions of the logits are the decoder's for an encoder-decoder model: its mask, never the encoder's
        seq2seq = getattr(getattr(unwrap_model(self.model), "config", None), "is_encoder_decoder", False)
        mask = batch.get("decoder_attention_mask" if seq2seq else "attention_mask")
        if self.kd_options["ce_weight"] > 0 or not isinstance(mask, Tensor) or mask.dim() != 2:
            return None  # ce_weight > 0 without labels: kd_loss's error
        if self.shift_labels:
            mask = mask[..., 1:]
        elif positions is None or mask.shape != positions:
            return None
        return mask_labels(mask, self.ignore_index)  # (ce_weight == 0: read for their mask only)

    def get_batch_samples(self, epoch_iterator: Iterator[Any], num_batches: int,
                          device: torch.device) -> tuple[list[Any], Tensor | None]:  # fmt: skip
        """The next ``num_batches`` micro-batches of one optimizer step, and ``num_items_in_batch``: their labels
        that are not ``ignore_index`` (after the shift), over all processes when ``average_tokens_across_devices``;
        an unlabelled causal-LM batch counts its ``attention_mask``'s positions as the loss does (:meth:`_loss_labels`).
        None when a batch has neither (each micro-batch then counts by its own mean, as in ``Trainer``)."""
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
        self._own_count = count  # a count of ours: compute_loss does not check it again (a device sync per call)
        return batches, count

    def teacher_logits(self, teacher: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Logits ``[B, (T,) V]`` of one teacher on the student's inputs (labels removed; ``use_cache=False`` added
        when the teacher's forward takes it), under ``no_grad`` and the student's mixed-precision autocast; on any
        device (``compute_loss`` moves them to the student's)."""
        return logits_of(teacher(**inputs))

    def _decoder_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """An encoder-decoder student builds its ``decoder_input_ids`` from ``labels`` when the batch has none; the
        labels are not passed to it here (the loss is this trainer's), so build them as the model would, in place
        (the teachers get them too)."""
        inner = unwrap_model(model)  # DDP, PEFT
        if not getattr(getattr(inner, "config", None), "is_encoder_decoder", False):
            return
        if inputs.get("decoder_input_ids") is not None or inputs.get("decoder_inputs_embeds") is not None:
            return
        labels, prepare = inputs.get("labels"), getattr(inner, "prepare_decoder_input_ids_from_labels", None)
        if labels is None or prepare is None:
            raise ValueError(f"{type(inner).__name__} is an encoder-decoder model: DistillationTrainer needs "
                             "decoder_input_ids in the batch, or labels to build them from "
                             "(prepare_decoder_input_ids_from_labels)")  # fmt: skip
        inputs["decoder_input_ids"] = prepare(labels=labels)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """``kd_loss(student, teachers, labels=...)``: a sum over the items divided by ``num_items_in_batch`` when
        training with it (HF's gradient-accumulation contract), else the mean over this batch's labelled items."""
        inputs = dict(inputs)
        batch = dict(inputs)  # labels and attention_mask, as given
        self._decoder_inputs(model, inputs)
        given_shifted = inputs.pop("shift_labels", None) is not None
        inputs.pop("labels", None)  # the student must not compute its own loss
        inputs.pop("sample_weight", None)  # (the loss's, not a forward argument)
        if self.fused_linear:  # hidden states and heads (TeacherHead records), the logits never whole
            student, outputs = hidden_and_head(model, inputs)
            with torch.no_grad(), self.accelerator.autocast():  # the student's autocast (bf16 / fp16 args)
                heads = [hidden_and_head(t, _no_cache(t, inputs)) for t in self.teachers]
            device = student.hidden.device  # a device_map teacher's last layers may be elsewhere: moved first
            heads = [(_on_device(h, device, self._moved_heads, f"teachers[{k}]"), out)
                     for k, (h, out) in enumerate(heads)]  # fmt: skip
            if not self._heads_checked:  # a logit transform no config attribute shows: once, [B, 1, V] each
                for name, (head, out) in [("model", (student, outputs)),
                                          *((f"teachers[{k}]", ho) for k, ho in enumerate(heads))]:  # fmt: skip
                    check_head_output(name, head, out)
                self._heads_checked = True
            teachers = [head for head, _ in heads]
            if return_outputs and self._predicting and isinstance(outputs, dict):  # compute_metrics / predict:
                # the full logits, as the logits path hands them, in evaluation only (no gradient, no chunking)
                with torch.no_grad():
                    outputs["logits"] = head_logits(student)
        else:
            outputs = model(**inputs)
            student = logits_of(outputs)
            with torch.no_grad(), self.accelerator.autocast():  # the student's autocast (bf16 / fp16 args)
                teachers = [self.teacher_logits(t, _no_cache(t, inputs)) for t in self.teachers]
            teachers = [_on_device(t, student.device) for t in teachers]  # a device_map teacher's may be elsewhere
        shift = self.shift_labels and not given_shifted
        if shift:
            x = student.hidden if self.fused_linear else student
            if x.dim() < 3:  # [B, C]: the shift would pair row i with the label of row i + 1
                labels, what = batch.get("labels"), "hidden states" if self.fused_linear else "logits"
                raise ValueError(f"shift_labels=True aligns position t with label t+1 and needs sequence outputs "
                                 f"([B, T, V] logits, [B, T] labels); got {what} of shape {tuple(x.shape)} and labels "
                                 f"of shape {None if labels is None else tuple(labels.shape)}: use "
                                 "shift_labels=False for non-sequence models")  # fmt: skip
        if shift and self.fused_linear:  # hidden states: their [:, :-1] slices cost O(N H)
            student, *teachers = (shift_positions(x) for x in (student, *teachers))
        positions = (student.hidden if self.fused_linear else student).shape[:-1]
        if shift and not self.fused_linear:  # the positions the labels are shifted to (the logits are not, below)
            positions = torch.Size((*positions[:-1], positions[-1] - 1))
        labels = self._loss_labels(batch, positions)
        from_mask = batch.get("labels") is None and batch.get("shift_labels") is None
        if labels is not None and from_mask and labels.shape != positions:
            raise ValueError(f"attention_mask (shifted: {tuple(labels.shape)}) does not line up with the positions "
                             f"of the logits {tuple(positions)}: pass labels (ignore_index where no loss)")  # fmt: skip
        sample_weight = batch.get("sample_weight")
        if sample_weight is not None and shift:  # per position, aligned as the labels (a shift_labels column: as is)
            sample_weight = sample_weight[..., 1:]
        if shift and not self.fused_linear:
            if labels is not None:
                # kd_loss skips ignored positions: the labels move, the logits stay whole ([:, :-1] slices of
                # [B, T, V] logits would be copied whole by kd_loss, a [B, T-1, V] buffer per model and step)
                labels = pad_last_position(labels, self.ignore_index)
                sample_weight = None if sample_weight is None else pad_last_position(sample_weight, 0)
            else:  # nothing to mask the last position with: the slices
                student, *teachers = (shift_positions(x) for x in (student, *teachers))
        weighted = {} if sample_weight is None else {"sample_weight": sample_weight}
        if not model.training:
            num_items_in_batch = None  # evaluation: each batch's own mean (Trainer averages the batches)
        own = num_items_in_batch is not None and num_items_in_batch is getattr(self, "_own_count", None)
        with functional.values_checked("num_items") if own else contextlib.nullcontext():
            loss = self._loss(student, teachers, labels, num_items_in_batch, weighted)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # num_items is the global count, and DDP averages the gradients over processes: undo that average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _loss(self, student: Any, teachers: list, labels: Tensor | None, num_items: Tensor | int | None,
              weighted: dict[str, Tensor]) -> Tensor:  # fmt: skip
        """The fused loss of one micro-batch: on the logits, or on the hidden states and heads (fused_linear)."""
        if self.fused_linear:
            # under the student's autocast, as its lm_head ran in the logits path: with bf16=True the head's matmuls
            # in bf16 (outside it, float32 matmuls of a float32 head: several times slower on a GPU); fp16=True's
            # float16 autocast the op leaves for float32 itself (fused_linear: a float16 chunk gradient underflows)
            with self.accelerator.autocast():
                return fused_linear_kd_loss(student.hidden, student.weight, teachers, labels,
                                            student_head_bias=student.bias, student_head_lora=student.lora,
                                            num_items=num_items, **weighted, **self.kd_options)  # fmt: skip
        return functional.kd_loss(student, teachers, labels=labels, num_items=num_items, **weighted,
                                  **self.kd_options)  # fmt: skip

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor | None, Any, Any]:
        """``Trainer.prediction_step``, but a batch without labels still gets its loss when the loss needs none
        (``ce_weight == 0``: pure KD): Trainer computes a loss only when every ``label_names`` entry is in the
        batch, and ``evaluate`` would report no ``eval_loss`` (``load_best_model_at_end`` then fails). Returns
        (loss, predictions, labels); with ``fused_linear`` the predictions are the full ``[B, T, V]`` logits."""
        self._predicting = not prediction_loss_only
        try:
            has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
            if has_labels or self.kd_options["ce_weight"] > 0 or inputs.get("return_loss") is False:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            inputs = self._prepare_inputs(inputs)
            if ignore_keys is None:  # as Trainer
                config = getattr(self.model, "config", None)
                ignore_keys = getattr(config, "keys_to_ignore_at_inference", ["cache"]) if config is not None else []
            with torch.no_grad(), self.compute_loss_context_manager():
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
            loss = loss.detach().mean()
            if prediction_loss_only:
                return loss, None, None
            # the student's outputs (no loss among them: compute_loss keeps the labels from the student)
            if isinstance(outputs, dict):
                outputs = tuple(v for k, v in outputs.items() if k not in ignore_keys)
            logits = nested_detach(outputs)
            return loss, logits[0] if isinstance(logits, (tuple, list)) and len(logits) == 1 else logits, None
        finally:
            self._predicting = False
