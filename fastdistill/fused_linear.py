"""Fused linear distillation: the loss of :func:`fastdistill.kd_loss` from the student's last hidden states and its
output head, chunk by chunk, so that the [N, V] logits (and their gradient) never exist whole.

For LLM distillation the largest tensors of a step are the logits: at N = 16384 tokens and V = 128256 one bf16
[N, V] tensor is 4.2 GB and its gradient another. Here rows are processed in chunks sized by a memory budget; each
chunk's logits come from a torch matmul, its loss and logit gradient from the fused row op of the backend in use
(:func:`fastdistill.kd_loss`, not a copy of its math), and the gradients to the hidden states, head weight and bias
from more matmuls. Teachers are given as logits, or as hidden states with their own (frozen) head
(:class:`TeacherHead`), whose logits are then computed chunk by chunk too. A head may carry low-rank terms
(:class:`LoRATerm`, a LoRA ``lm_head``), added per chunk, their gradients formed per chunk.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _warnings, functional
from .modules import _KDSettings
from .ops import dispatch, gemm, reference
from .ops.inputs import KDInputs, student_gradient_bounded

# Per chunk (its logits, the teachers' and the logit gradient), per device type. On CUDA the larger chunk matters for
# speed: every chunk's weight-gradient GEMM reads and writes the float32 accumulator (2 x 4 V H bytes) in its
# epilogue, which stays hidden under the GEMM's compute only from ~650 rows a chunk on an H200; 768 MiB (~1000 rows
# at V = 128256, K = 1) keeps a step's peak, the float32 accumulator and d hidden included, under a quarter of the
# unfused path's [N, V] buffers (benchmarks/NOTES.md, issue 19).
DEFAULT_BUDGET_BYTES = {"cpu": 256 * 2**20, "cuda": 768 * 2**20}
TILE_ROWS = 128  # chunks from a budget: a multiple of a GEMM tile's rows once there are two tiles or more


class LoRATerm(NamedTuple):
    """A low-rank term ``scaling * (x @ a.T) @ b.T`` added to a linear head's output: a LoRA adapter on the head,
    ``LoRATerm(layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])`` for peft's layer
    (``a`` [r, H], ``b`` [V, r]; ``scaling`` is lora_alpha / r, or / sqrt(r) with rslora: no default, so it is
    not left out by accident; adapter biases belong in the head's bias). The fused loss adds it to each chunk's
    logits and forms the gradients of ``a`` and ``b`` chunk by chunk ([r, H] and [V, r]), so a LoRA head costs no
    [V, H] weight or gradient. ``x @ a.T`` is computed in ``a``'s dtype, as peft does; its product with ``b`` in
    the logits' dtype (peft forms it in ``b``'s dtype and rounds once: for 16-bit logits a rounding more)."""

    a: Tensor
    b: Tensor
    scaling: float


class TeacherHead(NamedTuple):
    """A frozen teacher given by its last hidden states ``[*, H_t]`` and output head ``weight [V, H_t]`` (and
    ``bias [V]``, and :class:`LoRATerm` s ``lora`` added to its output): its logits are computed one chunk of rows
    at a time, never whole, and get no gradient."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None
    lora: tuple[LoRATerm, ...] = ()

    def shifted(self) -> TeacherHead:
        """The causal-LM alignment of :func:`fastdistill.training.data.shift_for_causal_lm`: positions 0..T-2 of
        hidden ``[B, T, H]`` (they predict tokens 1..T-1)."""
        return TeacherHead(self.hidden[..., :-1, :], self.weight, self.bias, self.lora)


# Config attributes by which a Hugging Face model rescales or slices lm_head(hidden) into its logits (the value that
# means "as is"): the fused loss takes lm_head(hidden) itself, so any other value would silently change the loss.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": 1,  # Cohere
    "logits_scaling": 1,  # Granite: logits divided by it
    "lm_head_multiplier": 1,  # Falcon-H1: logits times it (also kept on the base model)
    "logits_mup_width_multiplier": 1,  # Inkling: hidden states divided by it before the head
}


def _unwrapped(name: str, model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face model inside DDP / accelerate (``.module``) and PEFT (``get_base_model()``) wrappers, and
    the name to give it in messages (``name`` itself when unwrapped)."""
    from .training.data import unwrap_model  # lazy: training imports this module

    inner = unwrap_model(model)
    return inner, name if inner is model else f"{name} ({type(inner).__name__} inside {type(model).__name__})"


class _Adapter(NamedTuple):
    """One LoRA adapter (peft) on an output head: it adds ``scaling * B(A(x))`` to the head's output."""

    a: nn.Linear
    b: nn.Linear
    scaling: float


def _head_layers(name: str, model: nn.Module) -> tuple[nn.Linear, list[_Adapter]]:
    """The linear layer that ``model.get_output_embeddings()`` (``model`` unwrapped) computes with, and the LoRA
    adapters active on it, as peft's forward chooses them: a ``modules_to_save`` head (``ModulesToSaveWrapper``)
    is its active adapter's trainable copy (the original while adapters are disabled); a LoRA head
    (``lora.Linear``) is its base layer plus each active, unmerged adapter (a :class:`LoRATerm` of the head, its
    biases folded into the head's bias by :func:`_head_bias`). Reads the head, computes nothing. ValueError naming
    ``name`` for a head that is no linear map of the hidden states the fused loss could form: no linear head, a
    LoRA variant (DoRA, ...), LoRA dropout on the head (a random mask per row, no one weight), another kind of
    adapter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        active = list(getattr(head, "active_adapters", ()))  # peft's ModulesToSaveWrapper: its forward's choice
        copy = not head.disable_adapters and active and all(a in head.modules_to_save for a in active)
        head = head.modules_to_save[active[0]] if copy else head.original_module
    adapters: list[_Adapter] = []
    if head is not None and hasattr(head, "base_layer") and hasattr(head, "lora_A"):  # peft's LoRA layer
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        # disabled: the base layer alone (a merged adapter is unmerged by the forward); merged: in its weight
        for a in [] if head.disable_adapters or head.merged else head.active_adapters:
            if a not in head.lora_A:
                continue
            if getattr(head, "use_dora", {}).get(a) or a in getattr(head, "lora_variant", {}):
                raise ValueError(f"fused_linear: {name}'s output head has a LoRA variant (DoRA or another, adapter "
                                 f"{a!r}, {kind}), not a low-rank term the fused loss can add to its weight: leave "
                                 "lm_head out of target_modules, or use fused_linear=False")  # fmt: skip
            drop = head.lora_dropout[a]
            if not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
                raise ValueError(f"fused_linear: {name}'s output head has LoRA dropout ({drop!r}, adapter {a!r}): "
                                 "its output is no fixed linear map of the hidden states; use lora_dropout=0, leave "
                                 "lm_head out of target_modules, or use fused_linear=False")  # fmt: skip
            lora_a, lora_b = head.lora_A[a], head.lora_B[a]
            if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)):
                raise ValueError(f"fused_linear: {name}'s output head has a LoRA adapter {a!r} of "
                                 f"{type(lora_a).__name__} / {type(lora_b).__name__} layers, not nn.Linear; use "
                                 "fused_linear=False")  # fmt: skip
            adapters.append(_Adapter(lora_a, lora_b, float(head.scaling[a])))
        head = head.base_layer
    if isinstance(head, nn.Linear):
        return head, adapters
    if head is not None and any(hasattr(head, a) for a in ("base_layer", "original_module", "lora_A")):
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        raise ValueError(f"fused_linear: {name}'s output head is wrapped by an adapter ({kind}) that is not LoRA or "
                         "modules_to_save over a linear layer; the fused loss takes a linear head: leave lm_head out "
                         "of the adapter, or use fused_linear=False")  # fmt: skip
    raise ValueError(f"fused_linear: {name} has no linear output head (get_output_embeddings()); use "
                     "fused_linear=False")  # fmt: skip


def _head_bias(layer: nn.Linear, adapters: list[_Adapter]) -> Tensor | None:
    """The bias [V] of ``layer`` with its adapters' (:func:`_head_layers`) biases added: ``scaling * (B.weight @
    A.bias + B.bias)`` each, in the layer's dtype, with the autograd graph to the adapters' parameters. Without
    adapter biases, the layer's own bias, as it is."""
    bias = layer.bias
    for ad in adapters:
        extra = [ad.b.weight @ ad.a.bias] if ad.a.bias is not None else []
        extra += [ad.b.bias] if ad.b.bias is not None else []
        if extra:
            term = (ad.scaling * sum(extra)).to(layer.weight.dtype)
            bias = term if bias is None else bias + term
    return bias


def _passes_keyword(fn: Any, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword``, by name or through ``**kwargs`` (a wrapper's forward that passes it on)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_fusable(name: str, model: nn.Module) -> None:
    """That ``model``'s logits are ``get_output_embeddings()(base_model(...)[0])`` as :func:`hidden_and_head` reads
    them: a linear output head on a distinct base model, a forward that takes ``logits_to_keep`` (else it computes
    the full logits anyway), no logit scaling, soft-capping or vocabulary slicing in its config or modules
    (:data:`_LOGIT_TRANSFORMS`, ``unpadded_vocab_size`` != ``vocab_size``). A wrapped model (PEFT / LoRA:
    ``get_base_model()``; DDP: ``.module``) is checked inside, on its Hugging Face model; its own forward (the one
    called) must pass ``logits_to_keep`` on (``**kwargs``); a LoRA or ``modules_to_save`` head is read as
    :func:`_head_layers` says (other adapters on the head are refused).
    ValueError naming ``name`` and the attribute otherwise; :func:`check_head_output` then checks the first batch's
    logits at run time."""
    inner, label = _unwrapped(name, model)
    _head_layers(label, inner)
    if getattr(inner, "base_model", inner) is inner:
        raise ValueError(f"fused_linear: {label} has no base model under its head (base_model) whose output the head "
                         "reads; use fused_linear=False")  # fmt: skip
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        raise ValueError(f"fused_linear: {label}.forward does not take logits_to_keep, so it would compute the full "
                         "logits anyway; use fused_linear=False")  # fmt: skip
    if inner is not model and not _passes_keyword(model.forward, "logits_to_keep"):
        raise ValueError(f"fused_linear: {name}.forward ({type(model).__name__}) does not pass logits_to_keep on to "
                         f"{type(inner).__name__}; use fused_linear=False")  # fmt: skip
    if inner is not model:  # the attributes' owners, named from the model given
        name += ".get_base_model()" if callable(getattr(model, "get_base_model", None)) else ".module"
    config = getattr(inner, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None  # multimodal: the LM's config
    sources = [(f"{name}.config", config), (f"{name}.config (text config)", text), (name, inner),
               (f"{name}.base_model", inner.base_model)]  # fmt: skip
    seen: set[int] = set()
    for where, obj in sources:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        for attr, identity in _LOGIT_TRANSFORMS.items():
            value = getattr(obj, attr, None)
            if isinstance(value, Tensor):  # a module's buffer or parameter (a learned scale): as is only if it is 1
                value = value.item() if value.numel() == 1 else value
            if value is not None and (isinstance(value, Tensor) or value != identity):
                raise ValueError(f"fused_linear: {name} transforms its logits ({where}.{attr}={value!r}); the fused "
                                 "loss takes lm_head(hidden) as is: use fused_linear=False")  # fmt: skip
        if isinstance(obj, nn.Module):
            continue
        unpadded, vocab = getattr(obj, "unpadded_vocab_size", None), getattr(obj, "vocab_size", None)
        if unpadded is not None and unpadded != vocab:
            raise ValueError(f"fused_linear: {name} slices its logits to {where}.unpadded_vocab_size={unpadded} "
                             f"(vocab_size={vocab}); the fused loss takes lm_head(hidden) whole: use "
                             "fused_linear=False")  # fmt: skip


def check_head_output(name: str, head: TeacherHead, output: Any) -> None:
    """That the model's own logits (of the last position: ``logits_to_keep=1``) in ``output`` are ``head`` applied
    to its hidden states ``[B, T, H]`` at that position, up to 16-bit rounding (autocast): a cheap ([B, 1, V]) run
    time check for a logit transform :func:`check_fusable` cannot see in a config. ValueError naming ``name``."""
    from .training.data import logits_of  # lazy: training imports this module

    logits = logits_of(output).detach()
    with torch.no_grad():
        want = head_logits(head._replace(hidden=head.hidden[..., -1:, :]))
    if logits.shape != want.shape:
        raise ValueError(f"fused_linear: {name}'s logits of the last position have shape {tuple(logits.shape)}, its "
                         f"head applied to its hidden states {tuple(want.shape)}: the model transforms its logits; "
                         "use fused_linear=False")  # fmt: skip
    logits, want = logits.float(), want.to(logits.device).float()
    # 16-bit matmuls (autocast, a bf16 model) differ by ~1e-2 of the logits' scale; a rescale by far more
    if (logits - want).abs().max() > 3e-2 * want.abs().max() + 1e-5:
        raise ValueError(f"fused_linear: {name}'s logits are not lm_head(hidden) (largest difference "
                         f"{(logits - want).abs().max().item():.3g} at logit scale {want.abs().max().item():.3g}): the "
                         "model rescales or transforms its logits; use fused_linear=False")  # fmt: skip


def hidden_and_head(model: nn.Module, inputs: Any) -> tuple[TeacherHead, Any]:
    """A Hugging Face model's last hidden states (its base model's output, what the head reads) and output head (as
    a :class:`TeacherHead`, whatever the role), from one forward that forms the logits of the last position only
    (``logits_to_keep=1``); and the output. The hidden states are caught by a forward hook on ``base_model`` rather
    than asked for with ``output_hidden_states=True``, which would keep every layer's [B, T, H] alive in the output
    (under no_grad, (L + 1) B T H values: for a 32-layer teacher with H = 4096 about as much as the logits that
    fusing avoids). ``model`` may be wrapped by DDP (``model.module``) and PEFT (``get_base_model()``: a LoRA
    model): the hook and the head are the inner Hugging Face model's (a PEFT wrapper's own ``base_model`` is the
    adapter around the whole model, whose output is the logits), and the wrapper's forward is the one called
    (``logits_to_keep`` passed on through its ``**kwargs``). A LoRA head is its base weight and bias plus a
    :class:`LoRATerm` per active adapter (read after the forward, which unmerges a merged one): the fused loss adds
    their low-rank products chunk by chunk and forms the adapters' gradients the same way, so neither W + s·B·A
    nor its [V, H] gradient exists (the base weight's gradient only if it requires one). Adapter biases are folded
    into the head's bias (:func:`_head_bias`, a [V] tensor formed per call)."""
    inner, label = _unwrapped("model", model)
    layer, adapters = _head_layers(label, inner)  # checked before the forward, read after it (peft unmerges there)
    caught: list[Tensor] = []
    handle = inner.base_model.register_forward_hook(lambda _module, _args, out: caught.append(out[0]))
    try:
        out = model(**inputs, logits_to_keep=1) if isinstance(inputs, dict) else model(inputs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(caught) != 1:  # e.g. OPT, whose head reads model.decoder(...), not model(...)
        raise RuntimeError(f"fused_linear: {label}'s base model ({type(inner.base_model).__name__}) ran "
                           f"{len(caught)} times in one forward, expected once: its logits are not "
                           "lm_head(base_model(...)[0]); use fused_linear=False")  # fmt: skip
    hidden, weight = caught[0], layer.weight
    if hidden.dtype != weight.dtype:  # a 16-bit last projection under autocast, a float32 head: one dtype, so the
        hidden = hidden.to(weight.dtype)  # loss runs outside autocast too (under it, its matmuls follow autocast)
    lora = tuple(LoRATerm(ad.a.weight, ad.b.weight, ad.scaling) for ad in adapters)
    return TeacherHead(hidden, weight, _head_bias(layer, adapters), lora), out


Teacher = Tensor | TeacherHead
# Outside autocast a head's matmul takes one dtype; under bfloat16 autocast (float32 weights, 16-bit activations:
# the usual mixed precision) the matmuls follow it, as lm_head(hidden) would there. Under float16 autocast the op runs
# outside it, the hidden states cast to their head's dtype. Float16 logits' gradients are taken in the forward pass,
# before a GradScaler's factor could lift them out of float16's underflow: each chunk's is taken at a power of two S
# instead (_sweep's "lift"), the products with it summed in float32 and divided by S in backward (exact).
_ONE_DTYPE = ("they must share a dtype outside autocast (the head's matmul): cast one, or call under torch.autocast, "
              "where the head's matmuls run in its dtype as lm_head(hidden) would")
_AMP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on ``device`` now; None when it is off (or has no such device type)."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _autocast_as(device: torch.device, dtype: torch.dtype | None):
    """A context with autocast on ``device`` as it was (``dtype``: its dtype, None: off)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                              enabled=False)


def _castable(hidden: Tensor, weight: Tensor) -> bool:
    """Both of the dtypes autocast casts (float64 it leaves alone)."""
    return hidden.dtype in _AMP_DTYPES and weight.dtype in _AMP_DTYPES


def _dtypes_fit(hidden: Tensor, weight: Tensor, amp: torch.dtype | None) -> bool:
    return hidden.dtype == weight.dtype or (amp is not None and _castable(hidden, weight))


def _in_head_dtype(hidden: Tensor, weight: Tensor) -> Tensor:
    """``hidden`` cast to its head's dtype (float16 autocast, which the op runs outside), where autocast would cast."""
    return hidden.to(weight.dtype) if hidden.dtype != weight.dtype and _castable(hidden, weight) else hidden


def _logits_dtype(hidden: Tensor, weight: Tensor, amp: torch.dtype | None) -> torch.dtype:
    """The dtype of the logits ``hidden @ weight.T``: autocast's for the dtypes it casts, else the hidden states'."""
    return amp if amp is not None and _castable(hidden, weight) else hidden.dtype


def _check_head(name: str, weight: Tensor, bias: Tensor | None, width: int, device: torch.device,
                bias_name: str | None = None) -> None:  # fmt: skip
    bias_name = bias_name or f"{name} bias"
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"{name} weight must be a floating-point Tensor [V, H]")
    if weight.shape[1] != width:
        raise ValueError(f"{name} weight has shape {tuple(weight.shape)}: expected [V, {width}] (H of its hidden)")
    if weight.device != device:
        raise ValueError(f"{name} weight is on {weight.device} but student_hidden is on {device}")
    if bias is None:
        return
    if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
        raise ValueError(f"{bias_name} must be a Tensor [V] = [{weight.shape[0]}], got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")  # fmt: skip
    # the head's matmul is one addmm: the bias must share the weight's dtype and device
    if bias.dtype != weight.dtype:
        raise TypeError(f"{bias_name} is {bias.dtype} but the head weight is {weight.dtype}; they must share a dtype "
                        f"(cast the bias: bias.to({weight.dtype}))")  # fmt: skip
    if bias.device != weight.device:
        raise ValueError(f"{bias_name} is on {bias.device}, the head weight on {weight.device}")


def _check_lora(name: str, lora: Any, width: int, v: int, device: torch.device) -> tuple[LoRATerm, ...]:
    """``lora`` as a tuple of :class:`LoRATerm`, each ``a`` [r, H] and ``b`` [V, r] floating point on ``device``
    with a finite float ``scaling``; ValueError / TypeError naming ``name[i]`` otherwise."""
    if isinstance(lora, LoRATerm) or not isinstance(lora, Sequence) or isinstance(lora, str):
        raise TypeError(f"{name} must be a sequence of LoRATerm(a [r, H], b [V, r], scaling), got "
                        f"{type(lora).__name__}")  # fmt: skip
    checked = []
    for i, t in enumerate(lora):
        where = f"{name}[{i}]"
        if not isinstance(t, LoRATerm):
            raise TypeError(f"{where} must be a LoRATerm(a [r, H], b [V, r], scaling), got {type(t).__name__}")
        for part, m in (("a", t.a), ("b", t.b)):
            if not isinstance(m, Tensor) or not m.is_floating_point() or m.dim() != 2:
                raise TypeError(f"{where}.{part} must be a floating-point Tensor, 2-D")
            if m.device != device:
                raise ValueError(f"{where}.{part} is on {m.device} but student_hidden is on {device}")
        r = t.a.shape[0]
        if t.a.shape[1] != width or tuple(t.b.shape) != (v, r):
            raise ValueError(f"{where}: a has shape {tuple(t.a.shape)}, b {tuple(t.b.shape)}; expected a [r, {width}] "
                             f"and b [{v}, r] (H of its hidden states, V of its head)")  # fmt: skip
        scaling = t.scaling
        if isinstance(scaling, Tensor) and scaling.numel() == 1 and not scaling.requires_grad:
            scaling = scaling.item()
        if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
            raise TypeError(f"{where}.scaling must be a real number, got {type(t.scaling).__name__}")
        if not math.isfinite(scaling):
            raise ValueError(f"{where}.scaling must be finite, got {scaling!r}")
        checked.append(t._replace(scaling=float(scaling)))  # (a tensor's value read once: one device sync)
    return tuple(checked)


# what teacher logits must match here: the student's logits, [*] of student_hidden by V of its head
_HEAD_HINT = dict(ref="the student's logits (student_hidden's rows x student_head_weight's V)",
                  student_slice="student_head_weight[:{}] (and its bias)")


def _warn_teacher_graph(teachers: Teacher | Sequence[Teacher]) -> None:
    """Teachers get no gradient here (frozen, as documented): say so when a teacher's logits or hidden states carry
    an autograd graph, which is either a teacher run outside no_grad (its activations kept alive for nothing) or a
    co-distillation that expects a teacher gradient (kd_loss on materialised logits gives one). A head weight that
    requires grad says neither (a frozen model's parameters often do), so it is not warned about."""
    items = [teachers] if isinstance(teachers, (Tensor, TeacherHead)) else teachers
    for t in items if isinstance(items, Sequence) and not isinstance(items, str) else ():  # (bad types: raised later)
        x = t.hidden if isinstance(t, TeacherHead) else t
        if isinstance(x, Tensor) and x.requires_grad:
            what = "TeacherHead's hidden states" if isinstance(t, TeacherHead) else "logits"
            _warnings.warn(f"fused_linear_kd_loss: a teacher's {what} require grad, but teachers get no gradient "
                           "here (frozen): compute the teacher under torch.no_grad(), or use kd_loss on materialised "
                           "logits for teacher gradients (co-distillation)")  # fmt: skip
            return


def _teacher_list(teachers: Teacher | Sequence[Teacher], lead: torch.Size, v: int, device,
                  amp: torch.dtype | None = None, upcast: bool = False) -> list[Teacher]:  # fmt: skip
    """K teachers, each logits or a TeacherHead's hidden states as rows (:func:`_flat_rows`: [N, V] / [N, H_t], or
    the caller's [*, V] / [*, H_t] where no such view exists), detached (they get no gradient); shapes
    and devices checked against the student's. ``amp``: the autocast dtype the heads' matmuls follow (their hidden
    states and weights may then differ in dtype); ``upcast``: hidden states cast to their head's dtype (float16
    autocast, which the op runs outside)."""
    if isinstance(teachers, TeacherHead):
        teachers = [teachers]
    if isinstance(teachers, Tensor) or (isinstance(teachers, Sequence) and
                                        all(isinstance(t, Tensor) for t in teachers)):  # fmt: skip
        if isinstance(teachers, Sequence) and not teachers:
            raise ValueError("teachers is empty; need at least one teacher (K >= 1)")
        split = functional.split_teachers(teachers, torch.Size((*lead, v)), "teachers", **_HEAD_HINT)
        for k, t in enumerate(split):
            name = f"teachers[{k}]" if len(split) > 1 else "teachers"
            functional._check_device(name, t, device, ref="student_hidden")
        return [_flat_rows(t.detach(), v) for t in split]
    if not isinstance(teachers, Sequence) or isinstance(teachers, str) or not teachers:
        raise TypeError("teachers must be logits (a Tensor [*, V], [K, *, V] or a sequence of them), TeacherHead "
                        "(hidden, weight[, bias]) entries, or a sequence mixing both")  # fmt: skip
    out: list[Teacher] = []
    for k, t in enumerate(teachers):
        if isinstance(t, TeacherHead):
            if not isinstance(t.hidden, Tensor) or not t.hidden.is_floating_point():
                got = t.hidden.dtype if isinstance(t.hidden, Tensor) else type(t.hidden).__name__
                raise TypeError(f"teachers[{k}].hidden must be a floating-point Tensor [*, H_t], got {got}")
            if t.hidden.shape[:-1] != lead:
                raise ValueError(f"teachers[{k}].hidden must have shape [{', '.join(map(str, lead))}, H_t] (the "
                                 f"student's rows), got {tuple(getattr(t.hidden, 'shape', ()))}")  # fmt: skip
            functional._check_device(f"teachers[{k}].hidden", t.hidden, device, ref="student_hidden")
            _check_head(f"teachers[{k}]", t.weight, t.bias, t.hidden.shape[-1], device, f"teachers[{k}].bias")
            if upcast:
                t = t._replace(hidden=_in_head_dtype(t.hidden, t.weight))
            if not _dtypes_fit(t.hidden, t.weight, amp):
                raise TypeError(f"teachers[{k}].weight is {t.weight.dtype} but its hidden states are "
                                f"{t.hidden.dtype}; {_ONE_DTYPE}")  # fmt: skip
            if t.weight.shape[0] != v:
                raise ValueError(f"teachers[{k}].weight has V = {t.weight.shape[0]}, the student's head {v}")
            lora = _check_lora(f"teachers[{k}].lora", t.lora, t.hidden.shape[-1], v, device)
            out.append(TeacherHead(_flat_rows(t.hidden.detach(), t.hidden.shape[-1]), t.weight.detach(),
                                   None if t.bias is None else t.bias.detach(),
                                   tuple(LoRATerm(m.a.detach(), m.b.detach(), float(m.scaling)) for m in lora)))
        elif isinstance(t, Tensor):
            functional._check_logits(f"teachers[{k}]", t)
            if t.shape != (*lead, v):
                raise ValueError(functional._vocab_hint(f"teachers[{k}]", t.shape, torch.Size((*lead, v)),
                                                        **_HEAD_HINT))  # fmt: skip
            functional._check_device(f"teachers[{k}]", t, device, ref="student_hidden")
            out.append(_flat_rows(t.detach(), v))
        else:
            raise TypeError(f"teachers[{k}] must be a Tensor of logits or a TeacherHead, got {type(t).__name__}")
    return out


def _flat_rows(logits: Tensor, v: int) -> Tensor:
    """Teacher logits [*, V] (or a teacher's hidden states [*, H_t], v = H_t) as [N, V] rows: a view where one
    exists, else the tensor itself ([*, V], e.g. a [:, :-1] slice of [B, T, V] logits, or TeacherHead.shifted()'s
    hidden states), whose chunks :func:`_rows` gathers (a whole [N, V] copy would be the buffer this op exists to
    avoid; a whole [N, H_t] one, memory that grows with N)."""
    try:
        return logits.view(-1, v)
    except RuntimeError:
        return logits


def _rows(logits: Tensor, rows: slice) -> Tensor:
    """Rows ``rows`` of :func:`_flat_rows`'s result: a view of [N, V], or the chunk gathered from [*, V]."""
    if logits.dim() == 2:
        return logits[rows]
    index = torch.arange(rows.start, rows.stop, device=logits.device)
    return logits[torch.unravel_index(index, logits.shape[:-1])]


def _low_rank_inputs(hidden: Tensor, lora: Sequence[LoRATerm]) -> list[Tensor]:
    """Each term's ``hidden @ a.T`` [c, r], in ``a``'s dtype."""
    return [hidden.to(t.a.dtype) @ t.a.T for t in lora]


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, lora: Sequence[LoRATerm] = (),
            us: list[Tensor] | None = None, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """A chunk's logits [c, V] from its rows ``hidden`` [c, H]: ``hidden @ weight.T + bias`` plus each low-rank term
    (``us``: their :func:`_low_rank_inputs`, if computed already), written into ``out`` if given."""
    if out is None or hidden.dtype != weight.dtype or _autocast_dtype(hidden.device) is not None:
        # (out= variants ignore autocast, and take no mixed dtypes): the product, then its copy
        z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
        if out is not None:
            z = out.copy_(z)
    else:
        z = torch.mm(hidden, weight.T, out=out) if bias is None else torch.addmm(bias, hidden, weight.T, out=out)
    for t, u in zip(lora, us if us is not None else _low_rank_inputs(hidden, lora)):
        z.addmm_(u.to(z.dtype), t.b.T.to(z.dtype), alpha=t.scaling)
    return z


def head_logits(head: TeacherHead) -> Tensor:
    """``head``'s logits [*, V] of its hidden states [*, H], whole (for checks and evaluation, not the loss)."""
    x = head.hidden.reshape(-1, head.hidden.shape[-1])
    return _logits(x, head.weight, head.bias, head.lora).reshape(*head.hidden.shape[:-1], head.weight.shape[0])


def check_chunking(chunk_size: int | None, budget_bytes: int | None) -> None:
    """``chunk_size`` and ``memory_budget_bytes``: None or an int >= 1 each (numpy integers included)."""
    for name, value in (("chunk_size", chunk_size), ("memory_budget_bytes", budget_bytes)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be None or an int >= 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


def check_accum_dtype(accum_dtype: torch.dtype | None) -> None:
    """None or a floating-point torch.dtype (which one the head allows is checked with the head)."""
    if accum_dtype is not None and not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise TypeError(f"accum_dtype must be None or a floating-point torch.dtype, got {accum_dtype!r}")


def chunk_rows(n: int, v: int, k: int, itemsize: int, chunk_size: int | None, budget_bytes: int | None,
               device_type: str = "cpu", teacher_itemsize: int | None = None) -> int:  # fmt: skip
    """Rows per chunk: ``chunk_size`` if given, else as many as the budget (default: ``DEFAULT_BUDGET_BYTES`` of
    the device type) holds. A row costs its logits and the logit gradient the fused op computes with the loss (its
    backward scales that buffer in place: the graph is freed) in the input dtype (``itemsize`` bytes), and its K
    teachers' logits in theirs (``teacher_itemsize``, the widest; default ``itemsize``).
    From a budget, rows are rounded down to a multiple of TILE_ROWS when that leaves two tiles or more and the rows
    do not fit one chunk: the chunk's matmuls with a chunk-sized output dimension (d hidden: [c, H]) then have no
    partly-filled tile, but for the last chunk's."""
    check_chunking(chunk_size, budget_bytes)
    if chunk_size is not None:
        return min(int(chunk_size), max(n, 1))
    budget = int(budget_bytes) if budget_bytes is not None else DEFAULT_BUDGET_BYTES.get(device_type, 256 * 2**20)
    per_row = v * (2 * itemsize + k * (itemsize if teacher_itemsize is None else teacher_itemsize))
    rows = budget // per_row
    if n <= rows:
        return max(n, 1)  # one chunk: no rounding
    if rows >= 2 * TILE_ROWS:
        rows -= rows % TILE_ROWS
    return max(1, rows)


class _Plan(NamedTuple):
    """Everything a chunk needs besides the student's hidden states, head weight and bias and its LoRA terms' a
    and b (their scalings are here)."""

    teachers: list[Teacher]
    labels: Tensor | None  # [N]
    sample_weight: Tensor | None  # [N]
    teacher_weights: Tensor | None  # [K, N], normalised
    options: dict[str, Any]  # kd_loss keywords (divergence, temperature, ..., backend)
    accum_dtype: torch.dtype  # of the head weight's and bias's gradients while they add up over the chunks
    chunk_reduction: str  # "mean" (with the global count as num_items), "sum" or "none"
    num_items: Tensor | None  # the global denominator of "mean" (0-dim)
    denominator: float  # "batchmean": the sum is divided by it at the end; else 1
    chunk: int
    lead: torch.Size
    acc: torch.dtype  # of the loss: float64 if any input (student or teacher) is float64, else float32 (kd_loss's)
    scalings: tuple[float, ...] = ()  # of the student head's LoRA terms (their a, b are the Function's inputs)


def _chunk_teachers(plan: _Plan, z: Tensor, rows: slice) -> Tensor | list[Tensor]:
    """The chunk's teacher logits, as kd_loss takes them without a stacked copy: one teacher given as logits is a
    view; K teachers of one dtype are written into one [K, c, V] tensor (heads: each matmul writes its slice); mixed
    dtypes stay a list."""
    if len(plan.teachers) == 1 and isinstance(plan.teachers[0], Tensor):
        return _rows(plan.teachers[0], rows)
    amp = _autocast_dtype(z.device)  # a head's logits come out in autocast's dtype under it, as lm_head's would
    dtypes = {t.dtype if isinstance(t, Tensor) else _logits_dtype(t.hidden, t.weight, amp) for t in plan.teachers}
    if len(dtypes) > 1:
        return [_rows(t, rows) if isinstance(t, Tensor) else _logits(_rows(t.hidden, rows), t.weight, t.bias, t.lora)
                for t in plan.teachers]  # fmt: skip
    out = z.new_empty((len(plan.teachers), *z.shape), dtype=dtypes.pop())
    for k, t in enumerate(plan.teachers):
        if isinstance(t, Tensor):
            out[k].copy_(_rows(t, rows))
        else:
            _logits(_rows(t.hidden, rows), t.weight, t.bias, t.lora, out=out[k])
    return out


def _chunk_loss(plan: _Plan, z: Tensor, rows: slice) -> tuple[Tensor, KDInputs]:
    """The chunk's loss from the fused row op of the backend in use, and the op's checked inputs."""
    teachers = _chunk_teachers(plan, z, rows)
    tw = None if plan.teacher_weights is None else plan.teacher_weights[:, rows]
    inp = functional.kd_inputs(
        z, teachers, labels=None if plan.labels is None else plan.labels[rows], teacher_weights=tw,
        sample_weight=None if plan.sample_weight is None else plan.sample_weight[rows],
        reduction=plan.chunk_reduction, num_items=plan.num_items if plan.chunk_reduction == "mean" else None,
        **plan.options,
    )  # fmt: skip
    return dispatch.select(plan.options["backend"], inp)(inp), inp


def _sweep(plan: _Plan, h: Tensor, w: Tensor, b: Tensor | None, ab: Sequence[Tensor], need: tuple[bool, ...],
           grad_out: Tensor | None):  # fmt: skip
    """One pass over the chunks: the loss (0-dim sum of the chunks', or [N] rows) and the gradients of (grad_out x)
    the loss to those of h [N, H], w, b and the LoRA terms' a, b (``ab``: a_0, b_0, a_1, ...; scalings in ``plan``)
    that ``need`` (one flag each, in that order) asks for; None for the others. w's as a :class:`_HeadGrad`, w's and
    b's accumulated in the accumulation dtype, the LoRA terms' in float32 (float64 for float64 terms). A frozen
    head (a LoRA model's base head, a tied frozen embedding) costs no [V, H] buffer and no matmul; a LoRA term
    costs [c, r] per chunk and its gradients [r, H] and [V, r].

    Float16 logits without ``grad_out`` (the reduced losses, whose gradients are formed here, before backward's
    factor): each chunk's logit gradient is taken at grad_output S, the float16 prescale of all N rows (a power of
    two, ops/inputs.py), so that it is not lost to float16's underflow ((q - p) / N is under 6e-8 for most entries
    at realistic N and V); h's gradient is then a float32 :class:`_HeadGrad` too, and every gradient is S times
    the loss's. The last value returned is S (0-dim float32), or None where nothing was lifted."""
    n, acc = h.shape[0], plan.acc
    grads = any(need)
    lora = [LoRATerm(ab[2 * i], ab[2 * i + 1], s) for i, s in enumerate(plan.scalings)]
    lifted = grads and grad_out is None and _logits_dtype(h, w, _autocast_dtype(h.device)) == torch.float16
    lift: Tensor | None = None
    total = torch.zeros((), dtype=acc, device=h.device)
    rows_out = [] if plan.chunk_reduction == "none" else None
    gh: Tensor | _HeadGrad | None = None
    if need[0]:  # its row blocks contiguous
        gh = _HeadGrad(h, torch.float32) if lifted else torch.empty(h.shape, dtype=h.dtype, device=h.device)
    gw = _HeadGrad(w, plan.accum_dtype) if need[1] else None
    gb = torch.zeros(w.shape[0], dtype=plan.accum_dtype, device=w.device) if need[2] and b is not None else None
    gab = [torch.zeros(m.shape, dtype=torch.promote_types(m.dtype, torch.float32), device=m.device) if want else None
           for m, want in zip(ab, need[3:])]  # fmt: skip
    for start in range(0, max(n, 1), plan.chunk):  # N = 0: one empty chunk, so the backend checks its inputs
        rows = slice(start, min(n, start + plan.chunk))
        hc = h[rows]
        us = _low_rank_inputs(hc, lora)
        with torch.enable_grad(), functional.values_checked():
            z = _logits(hc, w, b, lora, us).detach().requires_grad_(grads)
            loss, inp = _chunk_loss(plan, z, rows)
            if lifted and lift is None and z.shape[0] > 0:  # one S for every chunk (each chunk's op prescales by
                lift = inp.fp16_lift(z, plan.sample_weight)  # its own S' >= S: backward's factor S / S' is exact)
                lift = torch.ones((), device=z.device) if lift is None else lift
            del inp  # (it holds the chunk's teachers: freed before the matmuls below)
            g = None
            if grads:
                go = None if grad_out is None else (grad_out[rows] if grad_out.dim() else grad_out)
                if lift is not None:
                    go = lift.to(loss.dtype)
                (g,) = torch.autograd.grad(loss, z, grad_outputs=go)
        del z  # (its graph is freed): only the logit gradient is left of the chunk for the matmuls below
        gus = []  # each term's d(hc @ a.T) = scaling * g @ b [c, r], in a's dtype (float32 sums of a 16-bit g)
        for i, t in enumerate(lora):
            if grads and (need[0] or need[3 + 2 * i]):
                gu = gemm.mm32(g, t.b.to(g.dtype)) if g.dtype in gemm.HALF else g @ t.b.to(g.dtype)
                gus.append((gu if lifted else gu.to(t.a.dtype)).mul_(t.scaling))  # lifted: float32's range
            else:
                gus.append(None)
        if lifted and gh is not None:  # S x the rows' gradient, formed and kept in float32 (a _HeadGrad)
            block = gemm.mm32(g, w)
            for gu, t in zip(gus, lora):
                block.addmm_(gu, t.a.to(block.dtype))
            gh.write_rows(start, block)
            del block
        elif gh is not None:
            if g.dtype == gh.dtype == w.dtype and not torch.is_grad_enabled():
                torch.mm(g, w, out=gh[rows])  # no [c, H] temporary
            else:  # autocast (g in its dtype, gh in h's), or recorded: the product, then its copy
                gh[rows] = g @ w
            for gu, t in zip(gus, lora):
                gh[rows] += (gu @ t.a).to(gh.dtype)
        if gw is not None:  # bfloat16 operands even into a float32 accumulator: the tensor cores (ops/gemm.py)
            gw.add_mm(g, hc)
        if gb is not None:
            gb.add_(g.sum(0, dtype=gb.dtype))
        for i, (t, u, gu) in enumerate(zip(lora, us, gus)):
            if gab[2 * i] is not None:  # d a += (scaling g b).T @ hc
                gab[2 * i].addmm_(gu.T.to(gab[2 * i].dtype), hc.to(gab[2 * i].dtype))
            if gab[2 * i + 1] is not None:  # d b += scaling g.T @ u, u as the logits used it (scaled at the end)
                _add_mm_into(gab[2 * i + 1], g.T, u.to(g.dtype))
        # the chunk's buffers released before the next chunk's are allocated: else its logit gradient would live
        # through the next chunk's kernel, one chunk unit more at the peak ((K + 3) units, not the budget's K + 2)
        del g, gus, us
        loss = loss.detach()
        if rows_out is not None:
            rows_out.append(loss)
        else:
            total = total + loss.to(acc)
        del loss
    for i, t in enumerate(lora):
        if gab[2 * i + 1] is not None:
            gab[2 * i + 1].mul_(t.scaling)
    out = torch.cat(rows_out) if rows_out is not None else total
    return out, gh, gw, gb, gab, lift


def _add_mm_into(c: Tensor, a: Tensor, b: Tensor) -> None:
    """``c += a @ b`` for a float32 (float64) ``c`` and operands of any floating dtype: half-precision ones through
    :func:`gemm.add_mm` (float32 sums on the tensor cores), others cast to ``c``'s dtype."""
    if a.dtype in gemm.HALF and c.dtype == torch.float32:
        gemm.add_mm(c, a, b)
    else:
        c.addmm_(a.to(c.dtype), b.to(c.dtype))


class _HeadGrad:
    """The head weight's gradient [V, H] while it adds up over the chunks, in ``accum_dtype`` (or a float16 student's
    hidden-state gradient [N, H] in float32, written a chunk of rows at a time); :meth:`result` hands it out in the
    weight's (hidden states') dtype.

    A float32 sum for a 16-bit head is held as two blocks of rows, and the 16-bit gradient is written into the first
    block's own memory (4 R H bytes hold 2 V H when R >= V / 2), so the step's peak is the float32 sum, not the sum
    plus a 16-bit copy: V H x 2 bytes less (1.05 GB at V = 128256, H = 4096; benchmarks/NOTES.md, issue 19). The
    first block's rows are narrowed front to back in blocks [lo, hi <= 2 lo), each written below the float32 rows it
    reads (the first rows through a small copy), then the second block is written behind them."""

    FIRST = 64  # rows narrowed through a copy: their 16-bit rows overlap their own float32 rows

    def __init__(self, w: Tensor, accum_dtype: torch.dtype) -> None:
        v, width = w.shape
        self.shape, self.dtype, self.device = (v, width), w.dtype, w.device
        # the cut at a multiple of 8 rows >= V / 2: the second block's columns of the logit gradient stay 16-byte
        # aligned for cuBLAS (V <= 8: one block, narrowed by a copy)
        cut = min(v, -(-v // 16) * 8) if accum_dtype.itemsize == 2 * w.dtype.itemsize else v
        self.parts = [torch.zeros(r, width, dtype=accum_dtype, device=w.device) for r in (cut, v - cut) if r > 0]
        self.cuts = [0, cut, v][: len(self.parts) + 1]

    def add_mm(self, g: Tensor, hc: Tensor) -> None:
        """+= g.T @ hc for a chunk's logit gradient g [c, V] and hidden states hc [c, H]."""
        for part, lo, hi in zip(self.parts, self.cuts, self.cuts[1:]):
            gemm.add_mm(part, g[:, lo:hi].T, hc)

    def write_rows(self, start: int, block: Tensor) -> None:
        """Rows [start, start + c) set to ``block`` [c, H]."""
        for part, lo, hi in zip(self.parts, self.cuts, self.cuts[1:]):
            a, b = max(lo, start), min(hi, start + block.shape[0])
            if a < b:
                part[a - lo : b - lo].copy_(block[a - start : b - start])

    def result(self, scale: Tensor | None) -> Tensor:
        """The gradient [V, H] in the weight's dtype, times ``scale`` (0-dim) if given. Hands the buffers out: call
        once."""
        parts, self.parts = self.parts, []
        if not parts:  # no rows (the hidden states' gradient of N = 0)
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        if len(parts) == 1:
            return _scaled(parts[0], scale, self.dtype)
        if gemm.is_traced(parts[0]):  # torch.compile: no aliasing tricks in a traced graph
            return torch.cat([_scaled(p, scale, self.dtype) for p in parts])
        first, second = parts
        v, width = self.shape
        rows = first.shape[0]
        out = first.view(self.dtype).view(-1)[: v * width].view(v, width)  # over the first block's bytes
        step = max(self.FIRST, rows // 8)  # bounded: on the CPU, torch narrows through a float32 temporary per call
        lo = min(self.FIRST, rows)
        out[:lo].copy_(_scaled(first[:lo], scale, self.dtype))
        while lo < rows:  # rows [lo, hi <= 2 lo): 16-bit bytes [2 lo H, 2 hi H), below the float32 ones read
            hi = min(2 * lo, lo + step, rows)
            _narrow(first[lo:hi], scale, out[lo:hi])
            lo = hi
        for lo in range(0, second.shape[0], step):  # onto float32 rows [R / 2, V / 2), all read above
            _narrow(second[lo : lo + step], scale, out[rows + lo : rows + lo + step])
        return out


def _narrow(src: Tensor, scale: Tensor | None, dst: Tensor) -> None:
    if scale is None:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def _scaled(grad: Tensor | None, scale: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """grad x scale (grad itself if scale is None) in ``dtype``, without a temporary as large as grad: in place in
    grad's own buffer, or written straight into the narrower dtype."""
    if grad is None:
        return None
    if grad.dtype == dtype:
        return grad if scale is None else grad.mul_(scale)
    out = torch.empty_like(grad, dtype=dtype)
    _narrow(grad, scale, out)
    return out


def _result(grad: Tensor | _HeadGrad | None, scale: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """A gradient handed out by backward: a :class:`_HeadGrad`'s result, or :func:`_scaled`'s."""
    return _scaled(grad, scale, dtype) if grad is None or isinstance(grad, Tensor) else grad.result(scale)


def _plan_tensors(plan: _Plan) -> list[Tensor]:
    """The tensors a recomputation of the chunks reads besides the Function's inputs: teachers, labels, weights."""
    out = [plan.labels, plan.sample_weight, plan.teacher_weights, plan.num_items]
    for t in plan.teachers:
        if isinstance(t, Tensor):
            out.append(t)
        else:
            out += [t.hidden, t.weight, t.bias, *(m for term in t.lora for m in (term.a, term.b))]
    return [x for x in out if x is not None]


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, h: Tensor, w: Tensor, b: Tensor | None, *ab: Tensor) -> Tensor:
        # Reductions to a scalar: the gradients are computed with the loss (one pass) and backward scales them.
        # "none": backward needs each row's grad_output, so it recomputes the chunks then.
        # Float16 logits whose gradient has no bound (reverse KL) cannot be lifted above float16's underflow before
        # backward's factor (a loss scaler's) is known: their chunks are recomputed in backward too, at it.
        need = tuple(ctx.needs_input_grad[1:])
        o = plan.options
        deferred = _logits_dtype(h, w, _autocast_dtype(h.device)) == torch.float16 and not student_gradient_bounded(
            o["divergence"], o["beta"], o["skew"], o["ce_weight"])  # fmt: skip
        early = any(need) and plan.chunk_reduction != "none" and not deferred
        out, *grads, lift = _sweep(plan, h, w, b, ab, need if early else (False,) * len(need), None)
        # the plan holds the teachers, labels and weights: kept only for "none"'s recomputation, so that a step's
        # teacher logits are not alive (through the graph) while the next step computes its own
        ctx.plan, ctx.early, ctx.denominator = None if early else plan, early, plan.denominator
        # "none" recomputes the chunks in backward, which autograd runs outside the caller's autocast: its state is
        # kept and restored there (as torch.amp.custom_fwd / custom_bwd do), so both passes form the same logits
        ctx.autocast = _autocast_dtype(h.device)
        ctx.dtypes = (h.dtype, None if b is None else b.dtype, *(m.dtype for m in ab))
        ctx.grads = grads if early else None  # not inputs or outputs: plain references, freed with ctx
        ctx.lift = lift  # float16: the gradients are S times the loss's (see _sweep)
        if not early:
            # the teachers, labels and weights the recomputation reads are saved too: one changed in place before
            # backward is autograd's error then, not a silently different gradient
            ctx.inputs = 3 + len(ab)
            ctx.save_for_backward(h, w, b, *ab, *_plan_tensors(plan))
        if plan.chunk_reduction == "none":
            return out.reshape(plan.lead)
        return out / plan.denominator

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        plan, (h_dtype, b_dtype, *ab_dtypes) = ctx.plan, ctx.dtypes
        if torch.is_grad_enabled():
            raise RuntimeError("fastdistill.fused_linear_kd_loss: create_graph=True (double backward) is not "
                               "supported: the gradients are formed chunk by chunk without a graph of their own, so a "
                               "second-order term would be 0; use kd_loss(backend='reference') on materialised "
                               "logits for second derivatives, or backward without create_graph")  # fmt: skip
        if ctx.early:  # the gradients of the loss itself, computed with it: scaled by grad_output here, in place
            if ctx.grads is None:
                raise RuntimeError("fused_linear_kd_loss: backward through the same loss twice (retain_graph=True) "
                                   "is not supported: its gradients are computed with the loss and handed out once; "
                                   "compute the loss again")  # fmt: skip
            (gh, gw, gb, gab), scale = ctx.grads, grad_out / ctx.denominator
            if ctx.lift is not None:
                scale = scale / ctx.lift  # a power of two: exact
            ctx.grads = None
        else:  # "none" (or float16 without a bound): the chunks again, each row's grad_output applied in them
            h, w, b, *ab = ctx.saved_tensors[: ctx.inputs]
            go = grad_out.reshape(-1) if plan.chunk_reduction == "none" else grad_out / ctx.denominator
            with _autocast_as(h.device, ctx.autocast):
                _, gh, gw, gb, gab, _ = _sweep(plan, h, w, b, ab, tuple(ctx.needs_input_grad[1:]), go)
            scale = None
        return (None, _result(gh, scale, h_dtype), _result(gw, scale, None), _scaled(gb, scale, b_dtype),
                *(_scaled(g, scale, d) for g, d in zip(gab, ab_dtypes)))


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teachers: Teacher | Sequence[Teacher],
    labels: Tensor | None = None,
    *,
    student_head_bias: Tensor | None = None,
    student_head_lora: Sequence[LoRATerm] = (),
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    divergence: str = "kl",
    temperature: float = 1.0,
    scale_by_temperature_sq: bool = True,
    ensemble: str = "prob_mean",
    teacher_weights: Tensor | Sequence[float] | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    num_items: int | Tensor | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`fastdistill.kd_loss` of the logits ``student_hidden @ student_head_weight.T + student_head_bias``
    (plus ``student_head_lora``'s low-rank terms), computed ``chunk_size`` rows at a time (default: as many as
    ``memory_budget_bytes`` holds: 256 MiB on the CPU, 768 MiB on CUDA), so that neither the [N, V] logits nor
    their gradient is ever materialised.

    Args:
        student_hidden: [*, H] the student's last hidden states (the ``lm_head``'s input).
        student_head_weight: [V, H] the student's output head (``lm_head.weight``); student_head_bias: [V] or None,
            in the weight's dtype and on its device (a TeacherHead's bias likewise).
        student_head_lora: :class:`LoRATerm` s (a [r, H], b [V, r], scaling) added to the student's head: a LoRA
            ``lm_head`` without its W + s·B·A or a [V, H] gradient (a frozen ``student_head_weight`` then costs no
            [V, H] buffer at all); their a and b get gradients, formed chunk by chunk.
        teachers: logits ([*, V], a stacked [K, *, V], or a sequence of K [*, V]), :class:`TeacherHead` entries
            (hidden [*, H_t] and a frozen head [V, H_t]: their logits are computed per chunk too), or a sequence
            mixing both. Teachers get no gradient (logits or hidden states that require grad are used as constants,
            with a UserWarning while autograd records).
        labels, and every keyword from ``divergence`` on: as in :func:`fastdistill.kd_loss` (``teacher_weights``
            [K] or [K, *]; ``sample_weight`` [*]; ``reduction`` "mean" divides by the labelled rows of the whole
            input, or ``num_items``).
        accum_dtype: the dtype in which the head weight's and bias's gradients add up over the chunks. None (the
            default): float32 (float64 for float64 inputs), which gives the unfused path's gradient up to the
            order of the sums; the head's own dtype (e.g. ``torch.bfloat16``) saves V x H x 2 bytes at the cost of
            one rounding to that dtype per chunk (Liger-Kernel's default). The matmuls run in the inputs' dtype
            either way. Not float16: a float16 head's gradients are formed at a power-of-two scale that keeps them
            above float16's underflow (a loss scaler's factor comes only in backward), and their sums need float32's
            range.

    Returns the loss: 0-dim, or [*] for ``reduction="none"``; float32 (float64 for float64 inputs). Gradients flow
    to ``student_hidden``, ``student_head_weight``, ``student_head_bias`` and the LoRA terms' a and b; for a
    reduced loss they are computed with it (one pass over the chunks) and handed out by its one backward (float16
    logits with a divergence whose gradient has no bound, reverse_kl or skew_reverse_kl at skew 0: recomputed in
    backward at grad_output, as for ``reduction="none"``, the teachers, labels and weights kept until then); under
    ``no_grad`` / ``inference_mode`` (evaluation) only the loss is computed, whatever requires grad. Extra memory:
    one chunk's logits, teachers' logits and logit gradient, plus the gradients of the inputs (the weight's in
    ``accum_dtype`` while it accumulates; a float32 sum is narrowed to the head's dtype in its own memory, no second
    [V, H] buffer).
    """
    if not isinstance(student_hidden, Tensor) or not student_hidden.is_floating_point() or student_hidden.dim() < 1:
        raise TypeError("student_hidden must be a floating-point Tensor [*, H]")
    lead, width = student_hidden.shape[:-1], student_hidden.shape[-1]
    _check_head("student_head", student_head_weight, student_head_bias, width, student_hidden.device,
                "student_head_bias")
    amp = _autocast_dtype(student_hidden.device)
    upcast = amp == torch.float16  # run outside float16 autocast, in the heads' dtypes (see _ONE_DTYPE's comment)
    if upcast:
        amp = None
        student_hidden = _in_head_dtype(student_hidden, student_head_weight)
    if not _dtypes_fit(student_hidden, student_head_weight, amp):
        raise TypeError(f"student_head_weight is {student_head_weight.dtype} but student_hidden is "
                        f"{student_hidden.dtype}; {_ONE_DTYPE}")  # fmt: skip
    functional.check_hyperparameters(
        divergence=divergence, temperature=temperature, ensemble=ensemble, beta=beta, skew=skew, ce_weight=ce_weight,
        reduction=reduction, backend=backend, ignore_index=ignore_index,
        scale_by_temperature_sq=scale_by_temperature_sq,
    )  # fmt: skip
    v = student_head_weight.shape[0]
    lora = _check_lora("student_head_lora", student_head_lora, width, v, student_hidden.device)
    n = math.prod(lead)
    wide = torch.float64 if student_head_weight.dtype == torch.float64 else torch.float32
    check_accum_dtype(accum_dtype)
    if accum_dtype is None:
        accum_dtype = wide
    elif accum_dtype not in (wide, student_head_weight.dtype):
        raise ValueError(f"accum_dtype must be None, {wide} or the head weight's dtype "
                         f"({student_head_weight.dtype}), got {accum_dtype}")  # fmt: skip
    elif accum_dtype == torch.float16:
        raise ValueError("accum_dtype=torch.float16 is not supported: a float16 head's gradients are summed at a "
                         "power-of-two scale that keeps them above float16's underflow, which needs float32's "
                         "range; leave accum_dtype=None (float32)")  # fmt: skip
    if torch.is_grad_enabled():
        _warn_teacher_graph(teachers)
    teacher_list = _teacher_list(teachers, lead, v, student_hidden.device, amp, upcast)
    # The per-row arguments checked once here, on the whole input (values included: a device sync each on CUDA), as
    # kd_loss checks them; the chunks then skip their data-dependent checks (functional.values_checked). The shape
    # probe is an expanded scalar: the logits' shape and device, no memory.
    probe = student_hidden.new_empty(()).expand(*lead, v)
    acc = reference.compute_dtype(student_hidden, *(t if isinstance(t, Tensor) else t.hidden for t in teacher_list))
    flat_labels, flat_sw, count = functional.row_arguments(
        probe, labels=labels, ignore_index=ignore_index, check_label_range=ce_weight > 0,
        label_use="when ce_weight > 0", sample_weight=sample_weight, reduction=reduction, num_items=num_items,
        acc=acc, name="student_hidden", last_dim="H",
    )  # fmt: skip
    if labels is None and ce_weight > 0:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy term)")
    tw = functional.normalise_teacher_weights(teacher_weights, len(teacher_list), lead, n, student_hidden.device,
                                              acc)  # fmt: skip  ([K, N], or None)
    chunk_reduction, denominator = reduction, 1.0
    if reduction == "batchmean":  # torch's meaning, as kd_loss: the logits' first dimension
        chunk_reduction, denominator = "sum", float(max(lead[0] if lead else v, 1))
    itemsize = student_hidden.element_size()
    teacher_itemsize = max((t.dtype if isinstance(t, Tensor) else _logits_dtype(t.hidden, t.weight, amp)).itemsize
                           for t in teacher_list)  # fmt: skip
    chunk = chunk_rows(n, v, len(teacher_list), itemsize, chunk_size, memory_budget_bytes, student_hidden.device.type,
                       teacher_itemsize)  # fmt: skip
    options = dict(divergence=divergence, temperature=temperature, scale_by_temperature_sq=scale_by_temperature_sq,
                   ensemble=ensemble, beta=beta, skew=skew, ignore_index=ignore_index, ce_weight=ce_weight,
                   backend=backend)  # fmt: skip
    plan = _Plan(teacher_list, flat_labels, flat_sw, tw, options, accum_dtype, chunk_reduction, count, denominator,
                 chunk, lead, acc, tuple(float(t.scaling) for t in lora))  # fmt: skip
    h = student_hidden.reshape(n, width)
    ab = [m for t in lora for m in (t.a, t.b)]
    with _autocast_as(h.device, None) if upcast else contextlib.nullcontext():
        if not torch.is_grad_enabled():  # no_grad / inference_mode (evaluation): the loss alone, no autograd
            # Function, so no head-gradient buffer or gradient matmuls for a head that requires grad
            out, *_ = _sweep(plan, h, student_head_weight, student_head_bias, ab, (False,) * (3 + len(ab)), None)
            return out.reshape(plan.lead) if chunk_reduction == "none" else out / denominator
        return _FusedLinearKD.apply(plan, h, student_head_weight, student_head_bias, *ab)


class FusedLinearKDLoss(_KDSettings):
    """:func:`fused_linear_kd_loss` with its hyper-parameters fixed in ``__init__`` (every keyword from
    ``chunk_size`` on, the same defaults). Settings are attributes read at every call, as :class:`fastdistill.KDLoss`'s
    (a tensor ``teacher_weights`` is a buffer: it moves with ``.to(device)``). Under ``torch.compile`` the module
    compiles with graph breaks (each chunk takes its own autograd pass), not with ``fullgraph=True``.

    Example::

        loss_fn = FusedLinearKDLoss(temperature=2.0, ce_weight=0.1)
        loss = loss_fn(hidden, model.lm_head.weight, teacher_logits, labels)
    """

    def __init__(
        self,
        *,
        chunk_size: int | None = None,
        memory_budget_bytes: int | None = None,
        divergence: str = "kl",
        temperature: float = 1.0,
        scale_by_temperature_sq: bool = True,
        ensemble: str = "prob_mean",
        teacher_weights: Tensor | Sequence[float] | None = None,
        beta: float = 0.5,
        skew: float = 0.1,
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        reduction: str = "mean",
        accum_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            divergence=divergence, temperature=temperature, scale_by_temperature_sq=scale_by_temperature_sq,
            ensemble=ensemble, teacher_weights=teacher_weights, beta=beta, skew=skew, ignore_index=ignore_index,
            ce_weight=ce_weight, reduction=reduction, backend=backend,
        )  # fmt: skip
        check_chunking(chunk_size, memory_budget_bytes)
        check_accum_dtype(accum_dtype)
        self.chunk_size, self.memory_budget_bytes, self.accum_dtype = chunk_size, memory_budget_bytes, accum_dtype

    def __setstate__(self, state: dict[str, Any]) -> None:
        options = state.pop("options", None)
        super().__setstate__(state)
        if options is not None:  # pickled when the settings were one dict: the defaults, then the options given
            defaults = {k: p.default for k, p in inspect.signature(FusedLinearKDLoss.__init__).parameters.items()
                        if p.default is not inspect.Parameter.empty}  # fmt: skip
            for key, value in {**defaults, **options}.items():
                if key == "teacher_weights" and isinstance(value, Tensor):
                    self.register_buffer(key, value, persistent=False)
                else:
                    setattr(self, key, value)

    def extra_repr(self) -> str:
        return (f"chunk_size={self.chunk_size}, memory_budget_bytes={self.memory_budget_bytes}, "
                f"{super().extra_repr()}, accum_dtype={self.accum_dtype}")  # fmt: skip

    def forward(self, student_hidden: Tensor, student_head_weight: Tensor, teachers: Teacher | Sequence[Teacher],
                labels: Tensor | None = None, *, student_head_bias: Tensor | None = None,
                student_head_lora: Sequence[LoRATerm] = (), sample_weight: Tensor | None = None,
                teacher_weights: Tensor | Sequence[float] | None = None,
                num_items: int | Tensor | None = None) -> Tensor:  # fmt: skip
        """student_hidden [*, H], student_head_weight [V, H]; teachers and the rest as in
        :func:`fused_linear_kd_loss`. ``teacher_weights`` here overrides the one given at construction."""
        return fused_linear_kd_loss(student_hidden, student_head_weight, teachers, labels,
                                    student_head_bias=student_head_bias, student_head_lora=student_head_lora,
                                    sample_weight=sample_weight, num_items=num_items, chunk_size=self.chunk_size,
                                    memory_budget_bytes=self.memory_budget_bytes, accum_dtype=self.accum_dtype,
                                    **self.kd_settings(teacher_weights))  # fmt: skip
