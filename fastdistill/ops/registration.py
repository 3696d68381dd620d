"""Fake (meta) kernels and autograd for the C++ ops whose schemas live in csrc/fastdistill.cpp.

The kernels compute the gradient in the forward pass (the loss is terminal), so backward only scales the saved
gradients by grad_output: one elementwise pass, registered here with plain torch ops so torch.compile traces it.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import extension


def _kd_loss_fake(
    student, teachers, teacher_weights, labels, sample_weight, denominator, divergence, ensemble, temperature,
    kd_scale, ce_weight, beta, skew, ignore_index, reduce, grad_student, grad_teachers,
):  # fmt: skip
    torch._check(student.dim() == 2, lambda: "student must be [N, V]")
    for t in teachers:
        torch._check(t.shape == student.shape, lambda: "teachers must match the student's [N, V]")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty(() if reduce else (student.shape[0],), dtype=acc)
    grad_s = student.new_empty(student.shape) if grad_student else student.new_empty((0,))
    grad_t = [t.new_empty(t.shape) if grad_teachers else t.new_empty((0,)) for t in teachers]
    return loss, grad_s, grad_t


def _kd_loss_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    # The gradient outputs are buffers for backward, not values to differentiate: without this autograd would
    # materialise a zero [N, V] "gradient of the gradient" on every backward.
    ctx.mark_non_differentiable(grad_s, *grad_t)
    ctx.set_materialize_grads(False)
    ctx.reduce = inputs[14]
    ctx.save_for_backward(grad_s, *grad_t)


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_reuse(grad: torch.Tensor, grad_loss: torch.Tensor) -> bool:
    """True when backward may return the saved gradient itself, scaled in place: nothing can read the buffer
    again. That holds in eager mode when the graph is freed after this backward (no retain_graph: a second
    backward through a retained graph, as gradcheck does, must see the saved gradient unchanged) and this backward
    is not itself recorded (create_graph). Functional graphs keep out of place: torch.compile, tracing or any
    other dispatch mode (Inductor reuses buffers itself), functorch transforms and tensor subclasses."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if type(grad) is not torch.Tensor or type(grad_loss) is not torch.Tensor:
        return False
    if torch.is_grad_enabled() or grad_loss.requires_grad:  # create_graph: backward is differentiated
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(grad_loss):
        return False
    return _keep_graph is not None and not _keep_graph()


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, reduce: bool) -> torch.Tensor | None:
    """d(input) = grad_loss * the saved gradient: for ``reduce`` a 0-dim factor applied as is (one rounding of
    grad * factor into grad's dtype), else [N] rows rounded to grad's dtype first, broadcast as [N, 1] over
    [N, V] and [K, N, V]. The operands, hence the bits, are the same in place and out of place."""
    if grad.dim() == 1:  # the [0] placeholder: not computed, the input did not require grad
        return None
    factor = grad_loss if reduce else grad_loss.to(grad.dtype).unsqueeze(-1)
    if not _may_reuse(grad, grad_loss):
        return grad * factor
    # Peak memory = the gradient: the saved buffer is the answer, and autograd adopts it as .grad without a copy.
    # grad_output == 1 exactly (plain loss.backward(), or loss.sum() of reduction="none") skips the pass over it:
    # grad * 1 is grad bit for bit, so the check only saves work, and it is made on the CPU only. On CUDA it is
    # a device sync (.item(), as in Liger-Kernel's backward): the host waits for the queued forward, so the launches
    # of the rest of the backward stop running ahead of the GPU, and inside CUDA graph capture it raises (and would
    # bake the captured value in). What it saves is one elementwise pass (read + write of the gradient: about
    # 0.25 ms at HBM bandwidth for the 512 MiB bf16 gradient of N = 8192, V = 32768 on an H200), while mul_ costs
    # no sync and already gives the peak.
    if _exactly_one(grad_loss):
        return grad
    return grad.mul_(factor)


def _first_order(op: str, grad: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient, unless it is being recorded for a second derivative (create_graph=True): then an error. The
    saved gradient is a constant to autograd, so a recorded one would have no path back to the inputs and every
    second-order term through this op (a gradient penalty, MAML, a Hessian-vector product) would silently be 0.
    The error is raised here, at the first backward, not when the gradient is differentiated (as torch's
    once_differentiable does): a second derivative taken towards upstream parameters would skip a delayed error
    and drop this op's term without a word. Eager mode only (torch.compile has no double backward either)."""
    if grad is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"fastdistill.{op}: create_graph=True (double backward) is not supported by the fused backends: their "
            "gradient is computed in the forward pass and its own derivative is not, so a second-order term "
            "would be 0; use backend='reference' for second derivatives, or backward without create_graph"
        )
    return grad


def _exactly_one(grad_loss: torch.Tensor) -> bool:
    """grad_output == 1 everywhere, where checking costs no device sync: CPU tensors (see _scale)."""
    return grad_loss.device.type == "cpu" and bool((grad_loss == 1).all())


def _kd_loss_backward(ctx, grad_loss, _grad_grad_s, _grad_grad_t):
    grad_s, *grad_t = ctx.saved_tensors
    # the gradient's structure must mirror the inputs': one entry per teacher for the Tensor[] argument
    none_t = [None] * len(grad_t)
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss
        return (None, none_t) + (None,) * 15
    d_student = _scale(grad_s, grad_loss, ctx.reduce) if ctx.needs_input_grad[0] else None
    d_teachers = [_scale(g, grad_loss, ctx.reduce) for g in grad_t] if ctx.needs_input_grad[1] else none_t
    return (_first_order("kd_loss", d_student), [_first_order("kd_loss", g) for g in d_teachers]) + (None,) * 15


def _kd_loss_triton_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)
    ctx.reduce = inputs[14]
    ctx.save_for_backward(grad_s, grad_t)


def _kd_loss_triton_backward(ctx, grad_loss, _grad_grad_s, _grad_grad_t):
    """Backward of fastdistill::kd_loss_triton: as for kd_loss, with the teachers' gradient one [K, N, V] tensor."""
    if grad_loss is None:
        return (None,) * 17
    grad_s, grad_t = ctx.saved_tensors
    d_student = _scale(grad_s, grad_loss, ctx.reduce) if ctx.needs_input_grad[0] else None
    d_teachers = _scale(grad_t, grad_loss, ctx.reduce) if ctx.needs_input_grad[1] else None
    return (_first_order("kd_loss", d_student), _first_order("kd_loss", d_teachers)) + (None,) * 15


def register_triton(op) -> None:
    """Autograd of the Triton op (its fake kernel comes from triton_op itself)."""
    op.register_autograd(_kd_loss_triton_backward, setup_context=_kd_loss_triton_setup_context)


# --- codistill_loss: (loss_a, loss_b, grad_a, grad_b); each loss depends on its own model only (stop-gradient). ---
CODISTILL_REDUCE = 15  # index of `reduce` in the schema


def _codistill_fake(
    a, b, labels, sample_weight, denominator, divergence, temperature, kd_scale, weight_ab, weight_ba, hard_a,
    hard_b, beta, skew, ignore_index, reduce, grad_a, grad_b,
):  # fmt: skip
    torch._check(a.dim() == 2 and b.shape == a.shape, lambda: "a and b must be [N, V] of one shape")
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    shape = () if reduce else (a.shape[0],)
    return (a.new_empty(shape, dtype=acc), a.new_empty(shape, dtype=acc),
            a.new_empty(a.shape) if grad_a else a.new_empty((0,)),
            b.new_empty(b.shape) if grad_b else b.new_empty((0,)))  # fmt: skip


def _codistill_setup_context(ctx, inputs, output):
    _, _, grad_a, grad_b = output
    ctx.mark_non_differentiable(grad_a, grad_b)
    ctx.set_materialize_grads(False)
    ctx.reduce = inputs[CODISTILL_REDUCE]
    ctx.save_for_backward(grad_a, grad_b)


def _codistill_backward(ctx, grad_loss_a, grad_loss_b, _gga, _ggb):
    """d/da comes from loss_a alone and d/db from loss_b alone: the other model's distribution is a constant."""
    grad_a, grad_b = ctx.saved_tensors
    d_a = d_b = None
    if ctx.needs_input_grad[0] and grad_loss_a is not None:
        d_a = _scale(grad_a, grad_loss_a, ctx.reduce)
    if ctx.needs_input_grad[1] and grad_loss_b is not None:
        d_b = _scale(grad_b, grad_loss_b, ctx.reduce)
    return (_first_order("codistill_loss", d_a), _first_order("codistill_loss", d_b)) + (None,) * 16


def register_codistill_triton(op) -> None:
    """Autograd of the Triton co-distillation op (its fake kernel comes from triton_op / register_fake)."""
    op.register_autograd(_codistill_backward, setup_context=_codistill_setup_context)


# --- MI-alpha: fastdistill::mi_alpha -> (estimate, stats [8, N]); backward recomputes score tiles from stats. ---
MI_STATS_ROWS = 8
MI_STATS_DA = 4  # stats[4] = dI/d(log_baseline)


def _mi_alpha_fake(student, teacher, log_baseline, alpha, temperature):
    torch._check(student.dim() == 2 and teacher.shape == student.shape, lambda: "student, teacher must be [N, D]")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty((), dtype=acc), student.new_empty((MI_STATS_ROWS, student.shape[0]), dtype=acc)


def _mi_alpha_backward_fake(grad, student, teacher, log_baseline, stats, alpha, temperature):
    return torch.empty_like(student), torch.empty_like(teacher)


def _mi_alpha_setup_context(ctx, inputs, output):
    student, teacher, log_baseline, alpha, temperature = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.alpha, ctx.temperature = alpha, temperature
    ctx.save_for_backward(student, teacher, log_baseline, stats)


def _mi_alpha_autograd(backward_op):
    """The autograd formula of an MI-alpha forward op whose gradients come from ``backward_op`` (same signature as
    fastdistill::mi_alpha_backward): d/d(log_baseline) is in stats, the rest is recomputed tile by tile."""

    def backward(ctx, grad, _grad_stats):
        if grad is None:
            return None, None, None, None, None
        student, teacher, log_baseline, stats = ctx.saved_tensors
        d_student = d_teacher = d_baseline = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            d_student, d_teacher = backward_op(grad, student, teacher, log_baseline, stats, ctx.alpha,
                                               ctx.temperature)  # fmt: skip
        if ctx.needs_input_grad[2]:
            d_baseline = (grad * stats[MI_STATS_DA]).to(log_baseline.dtype)
        d_student, d_teacher, d_baseline = (_first_order("mi_alpha", g) for g in (d_student, d_teacher, d_baseline))
        return d_student, d_teacher, d_baseline, None, None

    return backward


def register_mi_triton(forward_op, backward_op) -> None:
    """Autograd of the Triton MI-alpha ops (their fake kernels come from triton_op / register_fake)."""
    forward_op.register_autograd(_mi_alpha_autograd(backward_op), setup_context=_mi_alpha_setup_context)


if extension.available():
    torch.library.register_fake("fastdistill::kd_loss")(_kd_loss_fake)
    torch.library.register_autograd(
        "fastdistill::kd_loss", _kd_loss_backward, setup_context=_kd_loss_setup_context
    )
    torch.library.register_fake("fastdistill::codistill_loss")(_codistill_fake)
    torch.library.register_autograd(
        "fastdistill::codistill_loss", _codistill_backward, setup_context=_codistill_setup_context
    )
    torch.library.register_fake("fastdistill::mi_alpha")(_mi_alpha_fake)
    torch.library.register_fake("fastdistill::mi_alpha_backward")(_mi_alpha_backward_fake)
    torch.library.register_autograd(
        "fastdistill::mi_alpha",
        _mi_alpha_autograd(lambda *args: torch.ops.fastdistill.mi_alpha_backward(*args)),
        setup_context=_mi_alpha_setup_context,
    )
