"""Stateless distillation losses, in the style of ``torch.nn.functional`` (prediction first, target second).

Everything here validates and normalises arguments into an op record (:mod:`fastdistill.ops.inputs`), then hands
it to the backend chosen by :mod:`fastdistill.ops.dispatch`. The math lives in :mod:`fastdistill.ops.reference`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .ops import dispatch, divergences, reference
from .ops.inputs import SUPPORTED_DTYPES, CodistillInputs, KDInputs, MIInputs

REDUCTIONS = ("mean", "sum", "batchmean", "none")
TeacherLogits = Tensor | Sequence[Tensor]


# ---------------------------------------------------------------------------------------------------------------
# argument checks: each names the argument and what was expected


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``, or a ValueError naming the argument and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_real(name: str, value: object, *, low: float, high: float, low_open: bool, high_open: bool,
               note: str = "") -> float:  # fmt: skip
    """``value`` as a float, finite and in the interval (open or closed at each end), or an error naming ``name``
    (``note`` appended to the range error)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # comparisons only (no math.isfinite): under torch.compile(dynamic=True) v may be a symbolic float
    finite = -math.inf < v < math.inf  # false for nan too
    ok = finite and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}; got {value!r}{note}")
    return v


# float32 is the dtype the kernels take T**2 and 1 / T in: beyond these bounds one of them is inf or 0
_T_MIN, _T_MAX = 1e-19, 1e19
_INT64 = (-(2**63), 2**63 - 1)


def check_temperature(temperature: object) -> float:
    """T > 0 such that T**2 and 1 / T are finite and non-zero in float32: [1e-19, 1e19]."""
    return check_real("temperature", temperature, low=_T_MIN, high=_T_MAX, low_open=False, high_open=False)


def check_int(name: str, value: object, *, low: int, allow_none: bool = False) -> int | None:
    """``value`` as an int >= ``low`` (numpy integers too; a bool or a float is a TypeError naming ``name``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an int" + (" or None" if allow_none else "")
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_bool(name: str, value: object, *, allow_none: bool = False) -> None:
    """A bool (or None where allowed): not a string such as "False", which is true."""
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {type(value).__name__} "
                        f"{value!r}")


def _check_int64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64 [-2**63, 2**63 - 1], got {value}")
    return int(value)


# Hyper-parameter sets already validated (by type and value): a training loop calls the loss thousands of times with
# the same few, and the checks cost ~20 us of host time per call, before the kernel's launch.
_VALID_HYPERPARAMETERS: set[tuple] = set()


def check_hyperparameters(
    *, divergence: str, temperature: float, ensemble: str, beta: float, skew: float, ce_weight: float,
    reduction: str, backend: str, ignore_index: int, scale_by_temperature_sq: bool,
) -> None:  # fmt: skip
    """Validate the keyword hyper-parameters of :func:`kd_loss` (also used by :class:`fastdistill.KDLoss`)."""
    values = (divergence, temperature, ensemble, beta, skew, ce_weight, reduction, backend, ignore_index,
              scale_by_temperature_sq)  # fmt: skip
    if _is_compiling():  # the cache's contents would become Dynamo guards: a recompile whenever it grows
        _check_hyperparameters(*values)
        return
    try:
        key = tuple((type(x), x) for x in values)
        if key in _VALID_HYPERPARAMETERS:
            return
    except TypeError:  # unhashable: checked (and refused) below
        key = None
    _check_hyperparameters(divergence, temperature, ensemble, beta, skew, ce_weight, reduction, backend,
                           ignore_index, scale_by_temperature_sq)  # fmt: skip
    if key is not None and len(_VALID_HYPERPARAMETERS) < 4096:
        _VALID_HYPERPARAMETERS.add(key)


def _check_hyperparameters(divergence, temperature, ensemble, beta, skew, ce_weight, reduction, backend,
                           ignore_index, scale_by_temperature_sq) -> None:  # fmt: skip
    check_choice("divergence", divergence, divergences.NAMES)
    check_choice("ensemble", ensemble, reference.ENSEMBLES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, dispatch.BACKENDS_NAMES)
    check_temperature(temperature)
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta in (0, 1):
        # TRL's generalized_jsd_loss and Liger's JSD switch to a one-sided KL at beta = 0 and 1; the generalized JSD
        # itself tends to 0 at both ends (it is ~beta * KL(P || Q) near 0), so here the one-sided KLs have names.
        kl = "divergence='kl' (KL(P || Q), forward)" if beta == 0 else "divergence='reverse_kl' (KL(Q || P))"
        unused = "" if divergence == "jsd" else (f" (jsd's parameter: divergence={divergence!r} does not use it; "
                                                 "leave beta at its default)")  # fmt: skip
        raise ValueError(f"beta must be in (0, 1){unused}; got {beta}. TRL's and Liger's JSD mean a one-sided KL "
                         f"at beta = {beta:g}: here that is {kl}")  # fmt: skip
    values = {"beta": beta, "skew": skew}  # every divergence parameter (ops/divergences.py), checked whatever the
    used = {q.name for q in divergences.get(divergence).params}  # divergence, as always: a bad beta is an error
    for p in divergences.PARAMS.values():  # with "kl" too, whose message then says kl does not use it
        note = "" if p.name in used else (f" (a parameter of another divergence: divergence={divergence!r} does not "
                                          f"use {p.name}; leave it at its default)")  # fmt: skip
        check_real(p.name, values[p.name], low=p.low, high=p.high, low_open=p.low_open, high_open=p.high_open,
                   note=note)  # fmt: skip
    check_real("ce_weight", ce_weight, low=0.0, high=1.0, low_open=False, high_open=False)
    _check_int64("ignore_index", ignore_index)
    if not isinstance(scale_by_temperature_sq, bool):
        got = type(scale_by_temperature_sq)
        raise TypeError(f"scale_by_temperature_sq must be a Python bool (True or False), got "
                        f"{got.__name__ if got.__module__ == 'builtins' else f'{got.__module__}.{got.__name__}'}")


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [*, V] with at least one dimension, got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has V = 0 classes; a distribution needs V >= 1")


def _vocab_hint(name: str, got: torch.Size, expected: torch.Size, ref: str = "student_logits",
                student_slice: str | None = "student_logits[..., :{}]") -> str:  # fmt: skip
    """The error for teacher ``name`` of shape ``got`` where ``ref`` has ``expected``; for a vocabulary mismatch the
    fix (``student_slice``: how to cut the student to V = {} columns; None: the teachers must share one)."""
    if got[:-1] == expected[:-1] and got[-1] != expected[-1]:
        v_t, v_s = got[-1], expected[-1]
        if student_slice is None:
            fix = "the teachers must share one vocabulary"
        elif v_t > v_s:
            fix = f"slice the teacher to the shared vocabulary: {name}[..., :{v_s}]"
        else:
            fix = (f"slice the student to the shared vocabulary: {student_slice.format(v_t)}, or pad the teacher "
                   "with -inf")  # fmt: skip
        return f"{name} has vocabulary size {v_t} but {ref} has {v_s}; {fix}"
    return f"{name} has shape {tuple(got)}, expected {tuple(expected)} like {ref}"


def split_teachers(teacher_logits: TeacherLogits, student_shape: torch.Size, name: str = "teacher_logits",
                   **hint: str | None) -> list[Tensor]:  # fmt: skip
    """Teachers as a list of K tensors shaped like the student: one tensor [*, V], a stacked [K, *, V] tensor,
    or a sequence of K tensors [*, V]. Stacked tensors are unbound (views, no copy). ``name``: the argument's name in
    the errors; ``hint``: ``ref`` and ``student_slice`` of :func:`_vocab_hint` (what the teachers must match)."""
    if isinstance(teacher_logits, Tensor):
        _check_logits(name, teacher_logits)
        # (dims first: a tuple comparison compares [K, B, V] with [B, V] element by element, and K == B on symbolic
        # sizes becomes a guard that torch.export refuses for a dynamic batch)
        if teacher_logits.dim() == len(student_shape) and teacher_logits.shape == student_shape:
            return [teacher_logits]
        if teacher_logits.dim() == len(student_shape) + 1 and teacher_logits.shape[1:] == student_shape:
            if teacher_logits.shape[0] == 0:
                raise ValueError(f"{name} has K = 0 teachers; need at least one")
            return list(teacher_logits.unbind(0))
        if teacher_logits.dim() == len(student_shape) + 1 and teacher_logits.shape[1:-1] == student_shape[:-1]:
            raise ValueError(_vocab_hint(name, teacher_logits.shape[1:], student_shape, **hint))
        if teacher_logits.dim() == len(student_shape):
            raise ValueError(_vocab_hint(name, teacher_logits.shape, student_shape, **hint))
        raise ValueError(
            f"{name} must be [*, V] = {tuple(student_shape)} (one teacher) or [K, *, V] = "
            f"[K, {', '.join(map(str, student_shape))}] (K teachers); got {tuple(teacher_logits.shape)}"
        )
    if isinstance(teacher_logits, Sequence) and not isinstance(teacher_logits, str):
        teachers = list(teacher_logits)
        if not teachers:
            raise ValueError(f"{name} is an empty sequence; need at least one teacher (K >= 1)")
        for k, t in enumerate(teachers):
            _check_logits(f"{name}[{k}]", t)
            if t.shape != student_shape:
                raise ValueError(_vocab_hint(f"{name}[{k}]", t.shape, student_shape, **hint))
        return teachers
    raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, got {type(teacher_logits).__name__}")


def _check_constant(name: str, x: Tensor, hint: str = "") -> None:
    """A constant of the losses (SPEC §1: sample_weight, teacher_weights, num_items) given as a tensor that requires
    grad, under grad mode: a ValueError naming it, as torch refuses F.cross_entropy's ``weight=`` that requires grad;
    never a gradient the caller asked for dropped without a word. Forward-mode AD likewise: a tangent on it
    (torch.func.jvp / jacfwd, a forward_ad dual tensor) would give a derivative of 0."""
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but the loss takes it as a constant (no gradient flows to it): "
                         f"pass {name}.detach(){hint}")
    if dispatch.has_tangent(x):
        raise ValueError(f"{name} carries a forward-mode tangent (torch.func.jvp / jacfwd, or a dual tensor), but "
                         f"the loss takes it as a constant (its derivative would be 0): pass its primal value "
                         f"(torch.autograd.forward_ad.unpack_dual({name}).primal){hint}")


def _check_device(name: str, x: Tensor, device: torch.device, ref: str = "student_logits") -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {ref} is on {device}; all inputs must share a device")


# True (every argument's check skipped), or the names of the arguments whose checks are skipped
_VALUES_CHECKED: contextvars.ContextVar[bool | frozenset[str]] = contextvars.ContextVar("fastdistill_values_checked",
                                                                                       default=False)  # fmt: skip


def values_checked(*names: str) -> contextlib.AbstractContextManager[None]:
    """Within it the data-dependent checks of the arguments ``names`` (all of them when none is given; nested, the
    names of the enclosing ones too) are skipped:
    for a caller that checked those values already (on the whole input, or on the host before copying them to the
    device) and calls the losses on them (each check is a device sync on CUDA). While torch.compile traces, a
    no-op: the checks are skipped there anyway, and Dynamo cannot trace the context variable."""
    return contextlib.nullcontext() if _is_compiling() else _values_checked(names)


@contextlib.contextmanager
def _values_checked(names: tuple[str, ...]) -> Iterator[None]:
    outer = _VALUES_CHECKED.get()  # nested: adds to what the enclosing caller vouched for, never replaces it
    token = _VALUES_CHECKED.set(True if outer is True or not names else frozenset(names) | (outer or frozenset()))
    try:
        yield
    finally:
        _VALUES_CHECKED.reset(token)


def _vouched_for(name: str) -> bool:
    """A caller's :func:`values_checked` covers the argument ``name`` (not to be asked while compiling)."""
    checked = _VALUES_CHECKED.get()
    return checked is True or bool(checked and name in checked)


def _check_values(name: str, x: Tensor, what: str, bad: Tensor) -> None:
    """Data-dependent check (skipped under torch.compile, where it would break the graph, for the names
    :func:`values_checked` gives, and on meta tensors, which have no values: shape propagation)."""
    if _is_compiling() or _vouched_for(name) or x.device.type == "meta":  # compiling first: Dynamo cannot trace
        return  # the context variable's get
    if bool(bad.any()):
        raise ValueError(f"{name} must be {what}")


def check_codistill_weights(weight_ab: object, weight_ba: object,
                            hard_weight: object) -> tuple[float, float, tuple[float, float] | None]:  # fmt: skip
    """(weight_ab, weight_ba, (hard_a, hard_b)) of :func:`codistill_loss`, checked (>= 0, finite); the pair None
    for ``hard_weight=None`` (its default depends on the labels). Errors name the argument."""
    w_ab = check_real("weight_ab", weight_ab, low=0.0, high=math.inf, low_open=False, high_open=True)
    w_ba = check_real("weight_ba", weight_ba, low=0.0, high=math.inf, low_open=False, high_open=True)
    if hard_weight is None:
        return w_ab, w_ba, None
    if isinstance(hard_weight, tuple | list):
        if len(hard_weight) != 2:
            raise ValueError(f"hard_weight must be a float or a pair (hard_a, hard_b), got {hard_weight!r}")
        hard = tuple(check_real(f"hard_weight[{k}]", w, low=0.0, high=math.inf, low_open=False, high_open=True)
                     for k, w in enumerate(hard_weight))  # fmt: skip
        return w_ab, w_ba, hard
    h = check_real("hard_weight", hard_weight, low=0.0, high=math.inf, low_open=False, high_open=True)
    return w_ab, w_ba, (h, h)


def check_teacher_weights(teacher_weights: object) -> None:
    """What :func:`normalise_teacher_weights` can tell before the call's K and shapes: numbers finite and >= 0,
    not all 0; a tensor of floating point (its values are checked on first use); else a TypeError."""
    if teacher_weights is None or isinstance(teacher_weights, Tensor):
        if isinstance(teacher_weights, Tensor) and not teacher_weights.is_floating_point():
            raise TypeError(f"teacher_weights must be a floating-point tensor, got {teacher_weights.dtype}")
        return
    if not (isinstance(teacher_weights, Sequence) and not isinstance(teacher_weights, str) and all(
            isinstance(w, numbers.Real) and not isinstance(w, bool) for w in teacher_weights)):  # fmt: skip
        raise TypeError("teacher_weights must be None, a Tensor [K] or [K, *], or a sequence of K numbers")
    values = [float(w) for w in teacher_weights]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"teacher_weights must be {_WEIGHTS_RANGE}")
    if values and not max(values) > 0:
        raise ValueError(f"teacher_weights must be {_WEIGHTS_SUM}")


_WEIGHTS_RANGE = "finite and >= 0"
_WEIGHTS_SUM = "positive in every row (they are normalised to sum 1)"


def normalise_teacher_weights(
    teacher_weights: Tensor | Sequence[float] | None, k: int, lead: torch.Size, n: int, device: torch.device,
    dtype: torch.dtype,
) -> Tensor | None:
    """[K] or [K, *] non-negative weights -> [K, N] with every column summing to 1 (None stays None)."""
    if teacher_weights is None:
        return None
    on_host = not isinstance(teacher_weights, Tensor)
    if on_host:
        # checked here, on the host, and copied without a sync (torch.tensor(values, device=cuda) synchronises the
        # stream on every call): no data-dependent device check below
        check_teacher_weights(teacher_weights)
        teacher_weights = torch.tensor([float(w) for w in teacher_weights], dtype=torch.float64)
        if device.type != "cpu":
            teacher_weights = teacher_weights.to(device, non_blocking=True)
    w = teacher_weights
    if not w.is_floating_point():
        raise TypeError(f"teacher_weights must be a floating-point tensor, got {w.dtype}")
    _check_device("teacher_weights", w, device)
    _check_constant("teacher_weights", w)
    if w.shape == (k,):
        w = w[:, None].expand(k, n)
    elif w.shape == (k, *lead):
        w = w.reshape(k, n)
    else:
        raise ValueError(
            f"teacher_weights must be [K] = [{k}] or [K, *] = [{k}, {', '.join(map(str, lead))}], "
            f"got {tuple(w.shape)}"
        )
    w = w.detach()
    check = not on_host and not _weights_checked_before(teacher_weights, dtype)
    if check:
        _check_values("teacher_weights", w, _WEIGHTS_RANGE, ~torch.isfinite(w) | (w < 0))
    # scaled by the column's largest weight first, in the weights' own dtype (numbers: float64), then cast: the sum of
    # K weights near the dtype's max would overflow to inf and every weight would become 0, and a float64 weight past
    # float32's range (1e39, 1e-46) would be inf or 0 in float32 (NaN after normalising)
    w = (w / w.amax(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)).to(dtype)
    total = w.sum(0, keepdim=True)
    if check:
        _check_values("teacher_weights", total, _WEIGHTS_SUM, total <= 0)
        _remember_checked_weights(teacher_weights, dtype)
    return (w / total).contiguous()


# Weight tensors whose values passed both checks: (id, dtype) -> (weak reference, version counter). A constant given
# once (KDLoss(teacher_weights=tensor), or the same tensor passed on every call) is checked on its first use, not on
# every call (two syncs on CUDA); an in-place change bumps its version counter and it is checked again (a change
# through ``.data``, which bypasses the counter, is not seen: as for autograd's own checks). Bounded, and
# an entry whose tensor is gone is never matched: per-call [K, *] weights only pass through.
_CHECKED_WEIGHTS: dict[tuple[int, torch.dtype], tuple[weakref.ref, int]] = {}
_CHECKED_WEIGHTS_MAX = 32
_CHECKED_WEIGHTS_LOCK = threading.Lock()


def _weights_version(w: Tensor) -> int | None:
    """The version counter of ``w``; None where it has none (inference tensors) or while compiling (no check runs,
    nothing is remembered)."""
    if _is_compiling() or w.is_inference():
        return None
    return w._version


def _weights_checked_before(w: Tensor, dtype: torch.dtype) -> bool:
    version = _weights_version(w)
    entry = None if version is None else _CHECKED_WEIGHTS.get((id(w), dtype))
    return entry is not None and entry[0]() is w and entry[1] == version


def _remember_checked_weights(w: Tensor, dtype: torch.dtype) -> None:
    version = _weights_version(w)
    if version is None or _vouched_for("teacher_weights"):  # a caller's word is not a check
        return
    with _CHECKED_WEIGHTS_LOCK:  # losses called from several threads: the eviction iterates the dict
        if len(_CHECKED_WEIGHTS) >= _CHECKED_WEIGHTS_MAX:
            _CHECKED_WEIGHTS.pop(next(iter(_CHECKED_WEIGHTS)))
        _CHECKED_WEIGHTS[(id(w), dtype)] = (weakref.ref(w), version)


def _host_denominator(n: int | torch.SymInt, acc: torch.dtype, device: torch.device) -> Tensor:
    """max(n, 1) for a count known on the host, as a 0-dim ``acc`` tensor on ``device``: one device fill, not
    torch.tensor(n, device=...), whose host-to-device copy synchronises the stream on every call. ``n`` may be
    symbolic (torch.compile with dynamic shapes): then the same value from an int64 fill."""
    if isinstance(n, int):
        return torch.full((), float(max(n, 1)), dtype=acc, device=device)
    return torch.full((), n, dtype=torch.int64, device=device).to(acc).clamp_min(1)


def row_arguments(
    logits: Tensor,
    *,
    labels: Tensor | None,
    ignore_index: int,
    check_label_range: bool,
    label_use: str,
    sample_weight: Tensor | None,
    reduction: str,
    num_items: int | Tensor | None,
    acc: torch.dtype,
    name: str = "student_logits",
    last_dim: str = "V",
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Validate the per-row arguments against ``logits`` [*, V] (``name`` and its ``last_dim`` in the messages; only
    the shape and device of ``logits`` are read): labels int64 [N] (in range when
    ``check_label_range``), sample_weight [N] in ``acc``, and the reduction's denominator (0-dim, or None)."""
    v, lead, device = logits.shape[-1], logits.shape[:-1], logits.device
    n = math.prod(lead)
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be an int64 Tensor, got {type(labels).__name__}")
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64 (torch.long), got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels must have shape {tuple(lead)} ({name} without {last_dim}), got "
                             f"{tuple(labels.shape)}")  # fmt: skip
        _check_device("labels", labels, device, ref=name)
        labels = labels.reshape(n)
        if check_label_range and not _is_compiling():  # (the message's V would make V static in a compiled graph)
            _check_values(
                "labels", labels, f"in [0, {v}) or ignore_index ({ignore_index}) {label_use}",
                (labels != ignore_index) & ((labels < 0) | (labels >= v)),
            )  # fmt: skip

    if sample_weight is not None:
        if not isinstance(sample_weight, Tensor) or not sample_weight.is_floating_point():
            raise TypeError("sample_weight must be a floating-point Tensor")
        if sample_weight.shape != lead:
            raise ValueError(
                f"sample_weight must have shape {tuple(lead)} ({name} without {last_dim}), got "
                f"{tuple(sample_weight.shape)}"
            )
        _check_device("sample_weight", sample_weight, device, ref=name)
        _check_constant("sample_weight", sample_weight, "; for a gradient to per-row weights, weight the "
                        "reduction='none' losses yourself")  # fmt: skip
        sample_weight = sample_weight.detach().reshape(n).to(acc)
        _check_values("sample_weight", sample_weight, "finite and >= 0",
                      ~torch.isfinite(sample_weight) | (sample_weight < 0))  # fmt: skip

    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items overrides the 'mean' denominator; it has no meaning for reduction={reduction!r}")
    denominator = None
    if reduction == "mean":
        # No valid row: the sum is 0, and 0 / 1 keeps the loss 0 (never 0 / 0).
        if num_items is None:
            if labels is None:
                denominator = _host_denominator(n, acc, device)
            else:
                denominator = (labels != ignore_index).sum().to(acc).clamp_min(1)
        elif isinstance(num_items, Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be an int or a 0-dim Tensor, got shape {tuple(num_items.shape)}")
            if num_items.dtype == torch.bool or num_items.is_complex():
                raise TypeError(f"num_items must be an integer or floating-point count, got {num_items.dtype}")
            _check_constant("num_items", num_items)
            if num_items.device.type == "meta" and device.type != "meta":
                raise ValueError(f"num_items is a meta tensor (no value) but {name} is on {device}; pass the count "
                                 f"on {device} or the CPU")  # fmt: skip
            count = num_items.detach().reshape(()).to(device)
            _check_values("num_items", count, "finite and >= 0",
                          (count < 0) | ~torch.isfinite(count) if count.is_floating_point() else count < 0)
            # n itself, 1 only where n = 0 (0 / 1 keeps a loss without valid rows 0): a count n > 0 is >= 1 anyway,
            # and a weight sum below 1 (num_items=w.sum(), a weighted mean) must not be rounded up to 1
            count = count.to(acc)
            denominator = torch.where(count > 0, count, torch.ones_like(count))
        elif isinstance(num_items, numbers.Integral) and not isinstance(num_items, bool):
            if num_items < 0:
                raise ValueError(f"num_items must be >= 0, got {num_items}")
            denominator = _host_denominator(int(num_items), acc, device)
        else:
            raise TypeError(f"num_items must be an int or a 0-dim Tensor, got {type(num_items).__name__}")
    elif reduction == "batchmean":
        # torch's meaning: input.size(0), the batch (B of [B, T, V]; V itself for a single [V] row)
        denominator = _host_denominator(logits.shape[0], acc, device)

    return labels, sample_weight, denominator


def kd_inputs(
    student_logits: Tensor,
    teacher_logits: TeacherLogits,
    *,
    divergence: str,
    temperature: float,
    scale_by_temperature_sq: bool,
    ensemble: str,
    teacher_weights: Tensor | Sequence[float] | None,
    beta: float,
    skew: float,
    labels: Tensor | None,
    ignore_index: int,
    ce_weight: float,
    sample_weight: Tensor | None,
    reduction: str,
    num_items: int | Tensor | None,
    backend: str,
) -> KDInputs:
    """The op record of a :func:`kd_loss` call (every argument as in :func:`kd_loss`, all by keyword): arguments
    checked, ``[*, V]`` flattened to ``[N, V]``, teacher weights normalised, the reduction's denominator computed.
    Raises the errors :func:`kd_loss` raises."""
    check_hyperparameters(
        divergence=divergence, temperature=temperature, ensemble=ensemble, beta=beta, skew=skew,
        ce_weight=ce_weight, reduction=reduction, backend=backend, ignore_index=ignore_index,
        scale_by_temperature_sq=scale_by_temperature_sq,
    )  # fmt: skip
    _check_logits("student_logits", student_logits)
    teachers = split_teachers(teacher_logits, student_logits.shape)
    device = student_logits.device
    for k, t in enumerate(teachers):
        _check_device(f"teacher_logits[{k}]", t, device)
    v = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    n = math.prod(lead)
    acc = reference.compute_dtype(student_logits, *teachers)

    labels, sample_weight, denominator = row_arguments(
        student_logits, labels=labels, ignore_index=ignore_index, check_label_range=ce_weight > 0,
        label_use="when ce_weight > 0", sample_weight=sample_weight, reduction=reduction, num_items=num_items,
        acc=acc,
    )  # fmt: skip
    if labels is None and ce_weight > 0:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy term)")
    tw = normalise_teacher_weights(teacher_weights, len(teachers), lead, n, device, acc)

    c = temperature**2 if scale_by_temperature_sq else 1.0
    stacked = None
    if isinstance(teacher_logits, Tensor):  # one teacher [*, V] or a stacked [K, *, V]: keep a [K, N, V] view
        # (a copy where no view exists, e.g. a [:, :-1] slice of [B, T, V] logits: then the one copy, and the
        # teachers its views, not a second copy of each)
        stacked = teacher_logits.reshape(len(teachers), n, v)
    return KDInputs(
        student=student_logits.reshape(n, v),
        teachers=list(stacked.unbind(0)) if stacked is not None else [t.reshape(n, v) for t in teachers],
        teachers_stacked=stacked,
        teacher_weights=tw,
        labels=labels,
        sample_weight=sample_weight,
        denominator=denominator,
        divergence=divergence,
        ensemble=ensemble if len(teachers) > 1 else "prob_mean",
        temperature=float(temperature),
        kd_scale=(1.0 - float(ce_weight)) * c,
        ce_weight=float(ce_weight),
        div_params=divergences.param_vector(divergence, {"beta": beta, "skew": skew}),
        ignore_index=int(ignore_index),
        reduce=reduction != "none",
    )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: TeacherLogits,
    labels: Tensor | None = None,
    *,
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
    backend: str = "auto",
) -> Tensor:
    """Fused knowledge-distillation loss from raw logits (SPEC §1).

    Args:
        student_logits: [*, V] raw student logits (any leading shape; rows are flattened).
        teacher_logits: one teacher [*, V], a stacked [K, *, V] tensor, or a sequence of K tensors [*, V].
        labels: int64 [*] or None (positional, as in ``F.cross_entropy``): the hard labels of the cross-entropy
            term (``ce_weight``) and the rows to skip (``ignore_index``).
        divergence: "kl" (forward KL(P||Q), standard KD), "reverse_kl", "jsd" (weight ``beta`` on the teacher),
            "tvd", "skew_kl" or "skew_reverse_kl" (mixing weight ``skew``).
        temperature: T > 0, divides the student's and the teachers' logits.
        scale_by_temperature_sq: multiply the divergence by T**2 (Hinton et al.), which keeps gradient magnitudes
            comparable across temperatures. On by default; set False for the raw divergence.
        ensemble: how K > 1 teachers form the target: "prob_mean" (mixture of their distributions), "logit_mean"
            (softmax of the weighted mean logits) or "loss_mean" (mean of per-teacher divergences).
        teacher_weights: None (uniform), [K] or [K, *]; non-negative, normalised to sum 1 per row. Constant.
        ignore_index: rows whose label is this are skipped (no loss, zero gradient).
        ce_weight: in [0, 1]. Row loss = (1 - ce_weight) * c * D + ce_weight * CE(student at T = 1, labels).
        sample_weight: [*] non-negative per-row weights (0 skips a row). Constant. They scale rows, not the
            "mean" denominator (unlike torch's ``weight=``, whose mean divides by the weights' sum): pass
            ``num_items=w.sum()`` for that (any sum > 0, below 1 too), or ``num_items=(w > 0).sum()`` to count
            only weighted rows.
        reduction: "mean" (over rows not ignored, or ``num_items``), "sum", "batchmean" (divide by
            ``student_logits.shape[0]``, torch's meaning) or "none" (per-row losses, shape [*]). Rows are the
            positions [*] of [*, V]: "mean" is per token (TRL's), not ``F.kl_div``'s mean over N * V elements, and
            "none" returns [*], not [*, V].
        num_items: int or 0-dim Tensor replacing the "mean" denominator (HF ``num_items_in_batch``).
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        The loss: 0-dim, or [*] for ``reduction="none"``; float32 (float64 for float64 inputs). Differentiable
        with respect to ``student_logits`` and any teacher logits that require grad.
    """
    inp = kd_inputs(
        student_logits, teacher_logits, divergence=divergence, temperature=temperature,
        scale_by_temperature_sq=scale_by_temperature_sq, ensemble=ensemble, teacher_weights=teacher_weights,
        beta=beta, skew=skew, labels=labels, ignore_index=ignore_index, ce_weight=ce_weight,
        sample_weight=sample_weight, reduction=reduction, num_items=num_items, backend=backend,
    )  # fmt: skip
    loss = dispatch.select(backend, inp)(inp)
    return loss if inp.reduce else loss.reshape(student_logits.shape[:-1])


class CodistillLosses(NamedTuple):
    """The two losses of :func:`codistill_loss`: ``loss_a`` trains model a, ``loss_b`` trains model b."""

    loss_a: Tensor
    loss_b: Tensor


def codistill_loss(
    logits_a: Tensor,
    logits_b: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    weight_ab: float = 1.0,
    weight_ba: float = 1.0,
    hard_weight: float | tuple[float, float] | list[float] | None = None,
    divergence: str = "kl",
    scale_by_temperature_sq: bool = True,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    sample_weight: Tensor | None = None,
    reduction: str = "mean",
    num_items: int | Tensor | None = None,
    backend: str = "auto",
) -> CodistillLosses:
    """Co-training with co-distillation: two models learn from the labels and from each other, in one fused pass
    that reads both logits once and writes both gradients.

    Per row, with c = T**2 (or 1), D the divergence at temperature T (as in :func:`kd_loss`) and the other
    model's distribution held constant (stop-gradient):

        loss_a = hard_a * CE(logits_a, labels) + weight_ba * c * D(P_b, Q_a)     (b -> a: b teaches a)
        loss_b = hard_b * CE(logits_b, labels) + weight_ab * c * D(P_a, Q_b)     (a -> b: a teaches b)

    so ``(loss_a + loss_b).backward()`` trains both models, d/d(logits_a) coming from ``loss_a`` only. Equal to
    ``kd_loss(logits_a, logits_b.detach(), ...)`` and ``kd_loss(logits_b, logits_a.detach(), ...)`` with their
    weights, at about half their memory traffic.

    Args:
        logits_a, logits_b: [*, V] raw logits of the two models, same shape (dtypes may differ: promoted).
        labels: int64 [*] or None. Rows whose label is ``ignore_index`` are skipped in both losses.
        temperature: T > 0 of the distillation terms (cross-entropy is at T = 1).
        weight_ab: weight of the a -> b term (a teaches b), in ``loss_b``. >= 0.
        weight_ba: weight of the b -> a term (b teaches a), in ``loss_a``. >= 0.
        hard_weight: weight of each model's cross-entropy: one float for both, or a pair (hard_a, hard_b), each
            >= 0. Default: 1 with labels, 0 without.
        divergence, scale_by_temperature_sq, beta, skew: as in :func:`kd_loss`.
        sample_weight: [*] non-negative per-row weights (0 skips a row), in both losses. Constant.
        reduction, num_items, backend: as in :func:`kd_loss` (the same denominator for both losses).

    Returns:
        ``CodistillLosses(loss_a, loss_b)``: 0-dim each, or [*] for ``reduction="none"``; float32 (float64 for
        float64 inputs).
    """
    inp = codistill_inputs(
        logits_a, logits_b, labels=labels, temperature=temperature, weight_ab=weight_ab, weight_ba=weight_ba,
        hard_weight=hard_weight, divergence=divergence, scale_by_temperature_sq=scale_by_temperature_sq, beta=beta,
        skew=skew, ignore_index=ignore_index, sample_weight=sample_weight, reduction=reduction, num_items=num_items,
        backend=backend,
    )  # fmt: skip
    loss_a, loss_b = dispatch.select(backend, inp)(inp)
    if not inp.reduce:
        lead = logits_a.shape[:-1]
        loss_a, loss_b = loss_a.reshape(lead), loss_b.reshape(lead)
    return CodistillLosses(loss_a, loss_b)


def codistill_inputs(
    logits_a: Tensor,
    logits_b: Tensor,
    *,
    labels: Tensor | None,
    temperature: float,
    weight_ab: float,
    weight_ba: float,
    hard_weight: float | tuple[float, float] | list[float] | None,
    divergence: str,
    scale_by_temperature_sq: bool,
    beta: float,
    skew: float,
    ignore_index: int,
    sample_weight: Tensor | None,
    reduction: str,
    num_items: int | Tensor | None,
    backend: str,
) -> CodistillInputs:
    """The op record of a :func:`codistill_loss` call (every argument as there, all by keyword): arguments checked,
    ``[*, V]`` flattened to ``[N, V]``, the hard weights resolved, the reduction's denominator computed. Raises the
    errors :func:`codistill_loss` raises."""
    check_hyperparameters(
        divergence=divergence, temperature=temperature, ensemble="prob_mean", beta=beta, skew=skew, ce_weight=0.0,
        reduction=reduction, backend=backend, ignore_index=ignore_index,
        scale_by_temperature_sq=scale_by_temperature_sq,
    )  # fmt: skip
    w_ab, w_ba, hard = check_codistill_weights(weight_ab, weight_ba, hard_weight)
    if hard is None:
        hard = (1.0, 1.0) if labels is not None else (0.0, 0.0)
    if labels is None and max(hard) > 0:
        raise ValueError("hard_weight > 0 needs labels (each model's cross-entropy term); pass labels or 0")
    _check_logits("logits_a", logits_a)
    _check_logits("logits_b", logits_b)
    if logits_b.shape != logits_a.shape:
        raise ValueError(f"logits_b has shape {tuple(logits_b.shape)}, expected {tuple(logits_a.shape)} like logits_a")
    _check_device("logits_b", logits_b, logits_a.device, ref="logits_a")
    acc = reference.compute_dtype(logits_a, logits_b)
    labels, sample_weight, denominator = row_arguments(
        logits_a, labels=labels, ignore_index=ignore_index, check_label_range=max(hard) > 0,
        label_use="when hard_weight > 0", sample_weight=sample_weight, reduction=reduction, num_items=num_items,
        acc=acc, name="logits_a",
    )  # fmt: skip
    v, lead = logits_a.shape[-1], logits_a.shape[:-1]
    n = math.prod(lead)
    return CodistillInputs(
        a=logits_a.reshape(n, v), b=logits_b.reshape(n, v), labels=labels, sample_weight=sample_weight,
        denominator=denominator, divergence=divergence, temperature=float(temperature),
        kd_scale=float(temperature) ** 2 if scale_by_temperature_sq else 1.0, weight_ab=w_ab, weight_ba=w_ba,
        hard_a=hard[0], hard_b=hard[1], div_params=divergences.param_vector(divergence, {"beta": beta, "skew": skew}),
        ignore_index=int(ignore_index), reduce=reduction != "none",
    )  # fmt: skip


def ensemble_soft_targets(
    teacher_logits: TeacherLogits,
    *,
    temperature: float = 1.0,
    ensemble: str = "prob_mean",
    teacher_weights: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """The ensembled soft target P of K teachers, [*, V] probabilities (float32, float64 for float64 inputs).

    ``teacher_logits`` is a stacked [K, *, V] tensor or a sequence of K tensors [*, V], the two K-teacher forms
    of :func:`kd_loss` (one teacher: ``[t]`` or ``t.unsqueeze(0)``). "loss_mean" has no single target and raises.
    """
    check_choice("ensemble", ensemble, ("prob_mean", "logit_mean"))
    check_temperature(temperature)
    if isinstance(teacher_logits, Tensor):
        _check_logits("teacher_logits", teacher_logits)
        if teacher_logits.dim() < 2:
            raise ValueError(f"teacher_logits as one Tensor is the stacked [K, *, V] of K teachers (as in kd_loss); "
                             f"got shape {tuple(teacher_logits.shape)}. One teacher: pass [t] or t.unsqueeze(0)")
        shape = teacher_logits.shape[1:]
    elif isinstance(teacher_logits, Sequence) and teacher_logits and isinstance(teacher_logits[0], Tensor):
        shape = teacher_logits[0].shape
    elif isinstance(teacher_logits, Sequence) and not isinstance(teacher_logits, str) and not teacher_logits:
        raise ValueError("teacher_logits is empty: ensemble_soft_targets needs K >= 1 teachers")
    else:
        raise TypeError("teacher_logits must be a stacked Tensor [K, *, V] or a non-empty sequence of K Tensors "
                        "[*, V]")  # fmt: skip
    teachers = split_teachers(teacher_logits, shape, ref="teacher_logits[0]", student_slice=None)
    for k, t in enumerate(teachers):
        _check_device(f"teacher_logits[{k}]", t, teachers[0].device, ref="teacher_logits[0]")
    lead, v = shape[:-1], shape[-1]
    n = math.prod(lead)
    acc = reference.compute_dtype(*teachers)
    tw = normalise_teacher_weights(teacher_weights, len(teachers), lead, n, teachers[0].device, acc)
    flat = [t.reshape(n, v) for t in teachers]
    log_p = reference.ensemble_log_target(flat, float(temperature), ensemble, tw, acc)
    return log_p.exp().reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# MI-alpha (SPEC §2, §6)


def mi_alpha(
    student_feats: Tensor,
    teacher_feats: Tensor,
    *,
    alpha: float = 0.9,
    log_baseline: float | Tensor = 1.0,
    critic: str = "cosine",
    temperature: float = 0.1,
    anchor: str = "student",
    backend: str = "auto",
) -> Tensor:
    """The MI-alpha estimate of I(student; teacher) on a batch (Distiller; Poole et al.'s interpolated bound).

    The defaults are Distiller's released setup as far as it is known (alpha = 0.9, L2-normalised critic, each
    student row scored against the batch's teachers); temperature 0.1 is this library's choice (SPEC §2).

    Args:
        student_feats: [N, D] student representations, already projected by the critic (g_s(x)).
        teacher_feats: [N, D] teacher representations g_t(y); row i of both is the same example (the positive pair),
            every other pairing an in-batch negative. N >= 2.
        alpha: in [0, 1]. 0 is NWJ/TUBA (low bias, high variance); 1 is InfoNCE-like and never exceeds log(N - 1).
            Poole et al. report alpha = 0.01; Distiller's runs mostly use 0.9.
        log_baseline: the log-baseline a_i of row i (see ``anchor``): a float, or a Tensor [N] (learned; it
            receives a gradient). 1.0 makes alpha = 0 exactly NWJ.
        critic: "dot" (<u, v> / temperature) or "cosine" (<u/|u|, v/|v|> / temperature).
        temperature: > 0, divides the scores.
        anchor: which side the rows of the critic matrix are: "student" (each student example normalised over the
            batch's teachers: Distiller's code) or "teacher" (each teacher example over the students: Poole et al.'s
            baseline a(y) with y the teacher). Two different estimators, both lower bounds.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (materialises the N x N matrix).

    Returns:
        The estimate in nats: 0-dim float32 (float64 for float64 inputs), differentiable with respect to both
        feature tensors and a Tensor ``log_baseline``. Maximise it (or minimise ``-mi_alpha(...)``).
    """
    check_choice("critic", critic, reference.CRITICS)
    check_choice("anchor", anchor, reference.ANCHORS)
    check_choice("backend", backend, dispatch.BACKENDS_NAMES)
    alpha = check_real("alpha", alpha, low=0.0, high=1.0, low_open=False, high_open=False)
    temperature = check_temperature(temperature)
    for name, x in (("student_feats", student_feats), ("teacher_feats", teacher_feats)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a Tensor [N, D], got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if teacher_feats.shape != student_feats.shape:
        raise ValueError(
            f"teacher_feats has shape {tuple(teacher_feats.shape)}, expected {tuple(student_feats.shape)} like "
            f"student_feats (project both to one width with the critic: see fastdistill.MIAlphaLoss)"
        )
    n, d = student_feats.shape
    if _is_compiling():  # n may be data-dependent under torch.compile (rows a mask picks): asserted, not branched on
        torch._check(n >= 2, lambda: "mi_alpha needs N >= 2 rows (one positive and at least one negative pair)")
    elif n < 2:
        raise ValueError(f"mi_alpha needs N >= 2 rows (one positive and at least one negative pair), got N = {n}")
    if d < 1:
        raise ValueError("student_feats has D = 0 features; the critic needs D >= 1")
    _check_device("teacher_feats", teacher_feats, student_feats.device, "student_feats")
    if isinstance(log_baseline, Tensor):
        if not log_baseline.is_floating_point():
            raise TypeError(f"log_baseline must be a floating Tensor [N], got {log_baseline.dtype}")
        if tuple(log_baseline.shape) != (n,):
            raise ValueError(f"log_baseline must be a float or a Tensor of shape [N] = [{n}], got "
                             f"{tuple(log_baseline.shape)}")  # fmt: skip
        _check_device("log_baseline", log_baseline, student_feats.device, "student_feats")
        # as for a float baseline: +inf would make the estimate nan (inf - inf), not its limit
        _check_values("log_baseline", log_baseline.detach(), "finite", ~torch.isfinite(log_baseline.detach()))
    else:
        log_baseline = check_real("log_baseline", log_baseline, low=-math.inf, high=math.inf, low_open=True,
                                   high_open=True)  # fmt: skip
    # one dtype for both feature tensors (float64 wins; otherwise their promotion)
    common = torch.promote_types(student_feats.dtype, teacher_feats.dtype)
    # The ops anchor their rows on `teacher` (SPEC §6); the student anchor is the same op with the sides swapped.
    rows, cols = (teacher_feats, student_feats) if anchor == "teacher" else (student_feats, teacher_feats)
    inp = MIInputs(
        student=cols.to(common), teacher=rows.to(common), log_baseline=log_baseline,
        alpha=alpha, critic=critic, temperature=temperature,
    )  # fmt: skip
    return dispatch.select(backend, inp)(inp)
