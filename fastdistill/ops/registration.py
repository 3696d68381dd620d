"""Fake (meta) kernels and autograd for the C++ ops whose schemas live in csrc/fastdistill.cpp.

The kernels compute the gradient in the forward pass (the loss is terminal), so backward only scales the saved
gradients by grad_output: one elementwise pass, registered here with plain torch ops so torch.compile traces it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import eager, extension
from .inputs import (
    CodistillInputs,
    KDInputs,
    MIBackwardArgs,
    MIInputs,
    OpInputs,
    gradient_slots,
    op_teachers,
    stacked_teachers,
)

_KD_S, _KD_T = KDInputs.index("student"), KDInputs.index("teachers")


def _remember_lists(ctx, record: type[OpInputs], inputs: tuple) -> None:
    """Keep the structure autograd wants back for a call's list arguments. An op with a Tensor[] input (its
    argument a non-empty list of tensors) gets torch's list-aware autograd: a list of as many gradients for each
    list of tensors, where an empty list (a float[] without values included) counts as one, and one None for a list
    of numbers. Without one, every argument gets one None."""
    lists = [(n, v) for n, v in zip(record.names(), inputs) if isinstance(v, (list, tuple))]
    tensor_lists = [(n, v) for n, v in lists if all(isinstance(x, torch.Tensor) for x in v)]
    ctx.list_lens = {n: len(v) for n, v in tensor_lists} if any(v for _, v in tensor_lists) else {}


def _grads(record: type[OpInputs], ctx, **grads):
    """Autograd's answer for an op: one entry per argument of ``record.ARGS``, ``grads`` by name, None elsewhere
    (a list of Nones for a list argument)."""
    lens = getattr(ctx, "list_lens", {})
    return tuple(grads[n] if n in grads else ([None] * lens[n] if n in lens else None) for n in record.names())


def _kd_loss_fake(*args):
    a = KDInputs.named(args)
    student = a.student
    torch._check(student.dim() == 2, lambda: "student must be [N, V]")
    stacked, k = op_teachers(student, a.teachers)  # one [K, N, V] tensor: one gradient, [K, N, V] or none
    slots = gradient_slots(a.grad_teachers, k, stacked)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty(() if a.reduce else (student.shape[0],), dtype=acc)
    grad_s = student.new_empty(student.shape) if a.grad_student else student.new_empty((0,))
    on = [slot >= 0 for slot in slots]
    grad_t = [t.new_empty(t.shape if (any(on) if stacked else on[i]) else (0,)) for i, t in enumerate(a.teachers)]
    return loss, grad_s, grad_t


def _kd_loss_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    # The gradient outputs are buffers for backward, not values to differentiate: without this autograd would
    # materialise a zero [N, V] "gradient of the gradient" on every backward.
    ctx.mark_non_differentiable(grad_s, *grad_t)
    ctx.set_materialize_grads(False)
    ctx.reduce = KDInputs.arg(inputs, "reduce")
    _remember_lists(ctx, KDInputs, inputs)
    ctx.save_for_backward(grad_s, *grad_t)


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _may_reuse(grad: torch.Tensor, grad_loss: torch.Tensor) -> bool:
    """True when backward may return the saved gradient itself, scaled in place: nothing can read the buffer
    again. That holds in eager mode when the graph is freed after this backward (no retain_graph: a second
    backward through a retained graph, as gradcheck does, must see the saved gradient unchanged) and this backward
    is not itself recorded (create_graph). Functional graphs keep out of place: torch.compile, tracing or any
    other dispatch mode (Inductor reuses buffers itself), functorch transforms and tensor subclasses."""
    if _traced():
        return False
    if type(grad) is not torch.Tensor or type(grad_loss) is not torch.Tensor:
        return False
    if torch.is_grad_enabled() or grad_loss.requires_grad:  # create_graph: backward is differentiated
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(grad_loss) or _vmapped():
        return False
    return _keep_graph is not None and not _keep_graph()


def _scale(grad: torch.Tensor, grad_loss: torch.Tensor, reduce: bool) -> torch.Tensor | None:
    """d(input) = grad_loss * the saved gradient: for ``reduce`` a 0-dim factor, else [N] rows broadcast as [N, 1]
    over [N, V] and [K, N, V]. The product is taken in grad_loss's precision (float32; float64) and rounded once
    into grad's dtype (:func:`_product`), the same bits in place and out of place, on the CPU and the GPU: a factor
    rounded to a 16-bit gradient's dtype first would scale every entry by its rounding error, and would lose
    grad_output / S of a float16 prescale (ops/inputs.py) to underflow."""
    if grad.dim() == 1:  # the [0] placeholder: not computed, the input did not require grad
        return None
    if not _may_reuse(grad, grad_loss):
        # a functional graph (Inductor fuses it), a batched factor, or a recorded backward (create_graph: out= has
        # no autograd, and _first_order names the way out)
        if _traced() or _vmapped() or grad_loss.requires_grad:
            return (grad * (grad_loss.reshape(1) if reduce else grad_loss.unsqueeze(-1))).to(grad.dtype)
        return _product(grad, grad_loss, reduce, torch.empty_like(grad))
    # Peak memory = the gradient: the saved buffer is the answer, and autograd adopts it as .grad without a copy.
    # grad_output == 1 exactly (plain loss.backward(), or loss.sum() of reduction="none") skips the pass over it:
    # grad * 1 is grad bit for bit, so the check only saves work, and it is made on the CPU only. On CUDA it is
    # a device sync (.item(), as in Liger-Kernel's backward): the host waits for the queued forward, so the launches
    # of the rest of the backward stop running ahead of the GPU, and inside CUDA graph capture it raises (and would
    # bake the captured value in). What it saves is one elementwise pass (read + write of the gradient: about
    # 0.25 ms at HBM bandwidth for the 512 MiB bf16 gradient of N = 8192, V = 32768 on an H200): on CUDA the Triton
    # kernel of triton/scale.py makes that check on the device instead, each program for its own factor.
    if _exactly_one(grad_loss):
        return grad
    if _device_scale(grad):
        # on the GPU the kernel itself reads the factor and skips the pass where it is 1 (triton/scale.py): no sync
        from .triton.scale import scale_

        return scale_(grad, grad_loss, grad_loss.numel())
    return _product(grad, grad_loss, reduce, grad)


_BLOCK_ELEMENTS = 2**20  # a block's float32 copy in _product: at most 4 MiB (cache-sized: 2^22 took 3x as long)


def _product(grad: torch.Tensor, grad_loss: torch.Tensor, reduce: bool, out: torch.Tensor) -> torch.Tensor:
    """``out`` (``grad`` itself, or a buffer like it) = grad x grad_loss, the product in grad_loss's dtype, rounded
    once into grad's. On the CPU a factor given to torch as a scalar (0-dim, or a Python float) is applied in float32
    by the kernel itself (fast, exact, no copy). Otherwise the factor is shaped [1] / [N, 1], not 0-dim (a 0-dim CUDA
    operand is cast to the other's dtype), and on the CPU a 16-bit gradient with per-row factors is converted by
    blocks of rows (torch's mixed-dtype loop there is ~25x slower and copies the whole gradient to float32 twice),
    each block's copy at most 1/64 of the gradient's elements; fewer than 64 rows go one by one."""
    cpu = grad.device.type == "cpu"
    if reduce and cpu:
        return grad.mul_(grad_loss) if out is grad else torch.mul(grad, grad_loss, out=out)
    factor = grad_loss.reshape(1) if reduce else grad_loss.unsqueeze(-1)
    if not cpu or grad.dtype == factor.dtype:
        return grad.mul_(factor) if out is grad else torch.mul(grad, factor, out=out)
    n = grad.shape[-2]
    row = grad.numel() // max(n, 1)  # elements of one factor's rows: V, or K V over the teachers' [K, N, V]
    step = min(_BLOCK_ELEMENTS, grad.numel() // 64) // max(row, 1)
    if step < 1:
        for i, f in enumerate(grad_loss.tolist()):
            torch.mul(grad[..., i, :], f, out=out[..., i, :])
        return out
    for i in range(0, n, step):
        rows = slice(i, min(n, i + step))
        out[..., rows, :].copy_(grad[..., rows, :].to(factor.dtype).mul_(factor[rows]))
    return out


def _traced() -> bool:
    """Inside torch.compile or another dispatch mode (tracing, fake tensors): functional graphs."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def _device_scale(grad: torch.Tensor) -> bool:
    """The Triton in-place scale applies: a contiguous CUDA gradient of a dtype the kernels are compiled for."""
    from .triton.launch import ROW_KERNEL_GPU_DTYPES  # (torch only: no triton import)

    return (grad.device.type == "cuda" and grad.is_contiguous() and grad.dtype in ROW_KERNEL_GPU_DTYPES
            and importlib.util.find_spec("triton") is not None)  # fmt: skip


def _computed(op: str, name: str, grad: torch.Tensor) -> torch.Tensor:
    """``grad``, the saved gradient of an input autograd asks a gradient for. The [0] placeholder there means the
    forward ran where the input did not look as if it required grad (inside a torch.func transform, whose wrapped
    tensors hide it; a graph exported or traced under no_grad): an error naming the way out, never a silent None."""
    if grad.dim() == 1:
        raise RuntimeError(
            f"fastdistill.{op}: autograd asks for the gradient of {name}, but the fused backend did not compute it "
            f"in the forward pass: {name} did not require grad where the op ran (inside torch.func.vmap / grad / "
            "jacrev, or a graph exported or traced under no_grad). Use backend='reference' there (plain autograd)"
        )
    return grad


def _first_order(op: str, grad: torch.Tensor | None) -> torch.Tensor | None:
    """The gradient, unless it is being recorded for a second derivative (create_graph=True): then an error. The
    saved gradient is a constant to autograd, so a recorded one would have no path back to the inputs and every
    second-order term through this op (a gradient penalty, MAML, a Hessian-vector product) would silently be 0.
    The error is raised here, at the first backward, not when the gradient is differentiated (as torch's
    once_differentiable does): a second derivative taken towards upstream parameters would skip a delayed error
    and drop this op's term without a word. Also while compiling: Dynamo alone (backend="eager") differentiates
    twice; AOTAutograd traces backward with grad mode off, so the check does not fire there."""
    if grad is not None and torch.is_grad_enabled():
        raise RuntimeError(
            f"fastdistill.{op}: create_graph=True (double backward) is not supported by the fused backends: their "
            "gradient is computed in the forward pass and its own derivative is not, so a second-order term "
            "would be 0; use backend='reference' for second derivatives, or backward without create_graph"
        )
    return grad


def _exactly_one(grad_loss: torch.Tensor) -> bool:
    """grad_output == 1 everywhere, where checking costs no device sync: CPU tensors (see _scale; reached only where
    _may_reuse holds, so never on a batched grad_output)."""
    return grad_loss.device.type == "cpu" and bool((grad_loss == 1).all())


def _vmapped() -> bool:
    """Inside a functorch transform (torch.func.vmap, ...) or the legacy vmap of torch.autograd.functional's
    ``vectorize=True``: grad_output is batched below the Python level, so it has no single truth value and the
    saved gradient may be read again for the next batch entry."""
    # (the legacy VmapMode key has no Python enum member: read from the key set's repr)
    return torch._C._are_functorch_transforms_active() or "VmapMode" in repr(torch._C._dispatch_tls_local_include_set())


def _kd_loss_backward(ctx, grad_loss, _grad_grad_s, _grad_grad_t):
    grad_s, *grad_t = ctx.saved_tensors
    # the gradient's structure must mirror the inputs': one entry per teacher for the Tensor[] argument
    none_t = [None] * len(grad_t)
    if grad_loss is None:  # grads are not materialised: nothing flowed into the loss
        return _grads(KDInputs, ctx, student=None, teachers=none_t)
    d_student = (_scale(_computed("kd_loss", "student_logits", grad_s), grad_loss, ctx.reduce)
                 if ctx.needs_input_grad[_KD_S] else None)  # fmt: skip
    # a teacher that needs no gradient (its bit of grad_teachers clear) has an empty placeholder ([0]; a real one is
    # [N, V], or [K, N, V] for a stacked input): None
    d_teachers = ([None if g.dim() == 1 else _scale(g, grad_loss, ctx.reduce) for g in grad_t]
                  if ctx.needs_input_grad[_KD_T] else none_t)  # fmt: skip
    return _grads(KDInputs, ctx, student=_first_order("kd_loss", d_student),
                  teachers=[_first_order("kd_loss", g) for g in d_teachers])  # fmt: skip


def _kd_loss_triton_setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)
    ctx.reduce = KDInputs.arg(inputs, "reduce")
    _remember_lists(ctx, KDInputs, inputs)
    teachers = KDInputs.arg(inputs, "teachers")
    ctx.stacked = stacked_teachers(teachers)
    mask = KDInputs.arg(inputs, "grad_teachers")
    ctx.trained = [bool((mask >> k) & 1) for k in range(len(teachers))]  # (a stacked input: all or none)
    ctx.save_for_backward(grad_s, grad_t)


def _kd_loss_triton_backward(ctx, grad_loss, _grad_grad_s, _grad_grad_t):
    """Backward of fastdistill::kd_loss_triton: as for kd_loss, with the teachers' gradient one [M, N, V] tensor,
    the M trained teachers' (given back whole for a stacked input, as views for the trained ones of K teachers)."""
    if grad_loss is None:
        return _grads(KDInputs, ctx)
    grad_s, grad_t = ctx.saved_tensors
    d_student = (_scale(_computed("kd_loss", "student_logits", grad_s), grad_loss, ctx.reduce)
                 if ctx.needs_input_grad[_KD_S] else None)  # fmt: skip
    # (the [0] placeholder: the teachers did not require grad where the op ran; None, as in kd_loss's backward)
    # (needs_input_grad of the Tensor[] argument: one flag per tensor in it)
    wanted = any(ctx.needs_input_grad[_KD_T]) and grad_t.dim() == 3
    d_teachers = _first_order("kd_loss", _scale(grad_t, grad_loss, ctx.reduce)) if wanted else None
    if d_teachers is None:
        return _grads(KDInputs, ctx, student=_first_order("kd_loss", d_student))
    if ctx.stacked:
        return _grads(KDInputs, ctx, student=_first_order("kd_loss", d_student), teachers=[d_teachers])
    slots = iter(d_teachers.unbind(0))
    return _grads(KDInputs, ctx, student=_first_order("kd_loss", d_student),
                  teachers=[next(slots) if trained else None for trained in ctx.trained])  # fmt: skip


def _register_autograd(op, backward, setup_context, split=None) -> None:
    """The autograd of ``op`` (a name, or a custom op's ``CustomOpDef``), with torch and for eager.call (``split``:
    :data:`fastdistill.ops.eager.SPLITS`)."""
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        eager.register(op, backward, setup_context, split=split)
    else:  # a custom op of ours (the Triton twins): its Python function, called as is by the eager route
        op.register_autograd(backward, setup_context=setup_context)
        eager.register(op._qualname, backward, setup_context, impl=getattr(op, "_init_fn", None), split=split)


def register_triton(op) -> None:
    """Autograd of the Triton op (its fake kernel comes from triton_op itself)."""
    _register_autograd(op, _kd_loss_triton_backward, _kd_loss_triton_setup_context)


# --- codistill_loss: (loss_a, loss_b, grad_a, grad_b); each loss depends on its own model only (stop-gradient). ---
def codistill_fake(*args):
    """The fake kernel of fastdistill::codistill_loss and of its Triton twin."""
    x = CodistillInputs.named(args)
    a, b = x.a, x.b
    torch._check(a.dim() == 2 and b.shape == a.shape, lambda: "a and b must be [N, V] of one shape")
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    shape = () if x.reduce else (a.shape[0],)
    return (a.new_empty(shape, dtype=acc), a.new_empty(shape, dtype=acc),
            a.new_empty(a.shape) if x.grad_a else a.new_empty((0,)),
            b.new_empty(b.shape) if x.grad_b else b.new_empty((0,)))  # fmt: skip


def _codistill_setup_context(ctx, inputs, output):
    _, _, grad_a, grad_b = output
    ctx.mark_non_differentiable(grad_a, grad_b)
    ctx.set_materialize_grads(False)
    ctx.reduce = CodistillInputs.arg(inputs, "reduce")
    _remember_lists(ctx, CodistillInputs, inputs)
    ctx.save_for_backward(grad_a, grad_b)


def _codistill_backward(ctx, grad_loss_a, grad_loss_b, _gga, _ggb):
    """d/da comes from loss_a alone and d/db from loss_b alone: the other model's distribution is a constant."""
    grad_a, grad_b = ctx.saved_tensors
    d_a = d_b = None
    if ctx.needs_input_grad[CodistillInputs.index("a")] and grad_loss_a is not None:
        d_a = _scale(_computed("codistill_loss", "logits_a", grad_a), grad_loss_a, ctx.reduce)
    if ctx.needs_input_grad[CodistillInputs.index("b")] and grad_loss_b is not None:
        d_b = _scale(_computed("codistill_loss", "logits_b", grad_b), grad_loss_b, ctx.reduce)
    return _grads(CodistillInputs, ctx, a=_first_order("codistill_loss", d_a), b=_first_order("codistill_loss", d_b))


class _OwnLoss(torch.autograd.Function):
    """One model's loss of a fused co-distillation call on a graph node of its own (the eager route): the gradient
    the kernel wrote for that model alone is saved here, so ``loss_a.backward(); loss_b.backward()`` (two
    optimizers) works as with two separate losses, each backward freeing only its own gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, reduce: bool) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.reduce = reduce
        ctx.set_materialize_grads(False)
        return loss.clone()  # a tensor of its own (0-dim or [N]): an input returned as is would alias it

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None):
        (grad,) = ctx.saved_tensors
        d = None if grad_loss is None else _first_order("codistill_loss", _scale(grad, grad_loss, ctx.reduce))
        return d, None, None, None


def _codistill_split(args: tuple, out: tuple) -> tuple:
    """codistill_loss's outputs with loss_a and loss_b each on its own node (:data:`eager.SPLITS`)."""
    loss_a, loss_b, grad_a, grad_b = out
    a, b = (CodistillInputs.arg(args, name) for name in ("a", "b"))
    reduce = CodistillInputs.arg(args, "reduce")
    if a.requires_grad and torch.is_grad_enabled():
        loss_a = _OwnLoss.apply(a, loss_a, grad_a, reduce)
    if b.requires_grad and torch.is_grad_enabled():
        loss_b = _OwnLoss.apply(b, loss_b, grad_b, reduce)
    return loss_a, loss_b, grad_a, grad_b


def register_codistill_triton(op) -> None:
    """Autograd of the Triton co-distillation op (its fake kernel comes from triton_op / register_fake)."""
    _register_autograd(op, _codistill_backward, _codistill_setup_context, split=_codistill_split)


# --- MI-alpha: fastdistill::mi_alpha -> (estimate, stats [8, N]); backward recomputes score tiles from stats. ---
MI_STATS_ROWS = 8
MI_STATS_DA = 4  # stats[4] = dI/d(log_baseline)


def mi_alpha_fake(*args):
    """The fake kernel of fastdistill::mi_alpha and of its Triton twin."""
    x = MIInputs.named(args)
    student, teacher = x.student, x.teacher
    torch._check(student.dim() == 2 and teacher.shape == student.shape, lambda: "student, teacher must be [N, D]")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty((), dtype=acc), student.new_empty((MI_STATS_ROWS, student.shape[0]), dtype=acc)


def mi_alpha_backward_fake(*args):
    """The fake kernel of fastdistill::mi_alpha_backward and of its Triton twin."""
    x = MIBackwardArgs.named(args)
    return torch.empty_like(x.student), torch.empty_like(x.teacher)


def _mi_alpha_setup_context(ctx, inputs, output):
    x = MIInputs.named(inputs)
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)
    ctx.alpha, ctx.temperature = x.alpha, x.temperature
    ctx.save_for_backward(x.student, x.teacher, x.log_baseline, stats)


def _mi_alpha_autograd(backward_op):
    """The autograd formula of an MI-alpha forward op whose gradients come from ``backward_op`` (same signature as
    fastdistill::mi_alpha_backward): d/d(log_baseline) is in stats, the rest is recomputed tile by tile."""

    def backward(ctx, grad, _grad_stats):
        if grad is None:
            return _grads(MIInputs, ctx)
        student, teacher, log_baseline, stats = ctx.saved_tensors
        needs = dict(zip(MIInputs.names(), ctx.needs_input_grad))
        d_student = d_teacher = d_baseline = None
        if needs["student"] or needs["teacher"]:
            d_student, d_teacher = backward_op(*MIBackwardArgs.bind(
                grad=grad, student=student, teacher=teacher, log_baseline=log_baseline, stats=stats, alpha=ctx.alpha,
                temperature=ctx.temperature))  # fmt: skip
        if needs["log_baseline"]:
            d_baseline = (grad * stats[MI_STATS_DA]).to(log_baseline.dtype)
        return _grads(MIInputs, ctx, student=_first_order("mi_alpha", d_student),
                      teacher=_first_order("mi_alpha", d_teacher), log_baseline=_first_order("mi_alpha", d_baseline))

    return backward


def register_mi_triton(forward_op, backward_op) -> None:
    """Autograd of the Triton MI-alpha ops (their fake kernels come from triton_op / register_fake)."""
    _register_autograd(forward_op, _mi_alpha_autograd(backward_op), _mi_alpha_setup_context)


if extension.available():
    torch.library.register_fake("fastdistill::kd_loss")(_kd_loss_fake)
    _register_autograd("fastdistill::kd_loss", _kd_loss_backward, _kd_loss_setup_context)
    torch.library.register_fake("fastdistill::codistill_loss")(codistill_fake)
    _register_autograd("fastdistill::codistill_loss", _codistill_backward, _codistill_setup_context,
                       split=_codistill_split)
    torch.library.register_fake("fastdistill::mi_alpha")(mi_alpha_fake)
    torch.library.register_fake("fastdistill::mi_alpha_backward")(mi_alpha_backward_fake)
    _mi_backward = _mi_alpha_autograd(lambda *a: torch.ops.fastdistill.mi_alpha_backward(*a))
    _register_autograd("fastdistill::mi_alpha", _mi_backward, _mi_alpha_setup_context)
