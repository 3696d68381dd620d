"""Eager calls of the fused ops without torch's custom-op autograd wrapper.

``torch.library.register_autograd`` gives an op an autograd kernel written in Python that, on every call,
flattens the arguments with pytree (our ops take a Tensor[]), fills in the schema's defaults and unflattens the
outputs: ~30 µs of host time before the kernel starts and ~110 µs per forward on a 2-core host, against ~6 µs and
~20 µs for a plain ``torch.autograd.Function`` around the same op (``benchmarks/NOTES.md``, "Host time"). The
gradient of a fused op is written by its forward kernel, so a step whose GPU kernel is short (small V, a classifier's
logits) is host-bound, and at large V the time before the launch adds to every synchronised step.

:func:`call` runs an op through such a Function in plain eager mode, with the op's own ``setup_context`` and
``backward`` (the ones registered with torch, kept in one table here by :mod:`fastdistill.ops.registration`; for
the Triton ops also their Python function, called without the dispatcher's round trip), and
through the op itself everywhere else: under torch.compile, tracing, a dispatch mode (fake tensors, FlopCounter),
functorch transforms or tensor subclasses. Both routes run the same kernel and the same autograd code. A torch
function mode (``with torch.device(...)`` is one) sees the op's call on both routes; on this one inside the
Function's forward, where grad mode is off, as it is inside any custom op's kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# op name ("fastdistill::kd_loss") -> (setup_context, backward, Python implementation or None), as registered with
# torch
AUTOGRAD: dict[str, tuple[Callable, Callable, Callable | None]] = {}
# op name -> split(args, outputs): the op's outputs with each differentiable one on its own graph node (an op whose
# outputs depend on disjoint inputs: codistill_loss's loss_a on a, loss_b on b), so that backward through one frees
# only its own saved gradient and the other's backward still runs, as with two separate losses
SPLITS: dict[str, Callable] = {}
_FUNCTIONS: dict[str, type] = {}
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # other subclasses may override dispatch: they must see the op


def register(name: str, backward: Callable, setup_context: Callable, impl: Callable | None = None,
             split: Callable | None = None) -> None:  # fmt: skip
    """Record the autograd of op ``name`` for :func:`call` (its registration with torch is the caller's). ``impl``:
    the op's Python implementation (the Triton ops), which the eager route calls itself: the dispatcher's boxing of
    16 arguments, the custom op's aliasing check and its Dynamo guard cost ~10-15 µs before the launch. ``split``:
    see :data:`SPLITS` (``backward`` and ``setup_context`` then serve the op route only)."""
    AUTOGRAD[name] = (setup_context, backward, impl)
    if split is not None:
        SPLITS[name] = split
    _FUNCTIONS.pop(name, None)


_tracing_state = getattr(torch._C, "_get_tracing_state", None)  # TorchScript's (deprecated): may go in a release


def _plain_eager(args: tuple) -> bool | None:
    """None when the call must go through the op (see the module docstring); else whether autograd records it."""
    if (
        torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
        or (_tracing_state is not None and _tracing_state())
        or torch._C._are_functorch_transforms_active()
    ):  # vmap / grad / functionalize, even over plain tensors
        return None
    grad = False
    for a in args:
        for t in a if type(a) in (list, tuple) else (a,):
            if isinstance(t, torch.Tensor):
                if type(t) not in _PLAIN or _wrapped(t):
                    return None
                grad = grad or t.requires_grad
    return grad and torch.is_grad_enabled()


def _function(op: torch._ops.OpOverload) -> type:
    """The autograd.Function of ``op``: arguments and outputs flattened by hand (a Tensor[] into its tensors, in
    place), ``needs_input_grad`` and the gradients given to the op's backward in the schema's structure."""
    name = op._schema.name
    setup_context, backward_fn, impl = AUTOGRAD[name]
    run = impl if impl is not None else op
    list_returns = tuple(isinstance(r.type, torch._C.ListType) for r in op._schema.returns)

    def forward(ctx, lens: tuple[int, ...], *flat):
        args = _unflatten(flat, lens)
        with torch._C._AutoDispatchBelowAutograd():
            out = run(*args)
        setup_context(ctx, args, out)
        ctx.fd_lens = lens
        ctx.fd_out_lens = tuple(len(o) if is_list else -1 for o, is_list in zip(out, list_returns))
        return tuple(_flatten(out, ctx.fd_out_lens))

    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_unflatten(needs[1:], ctx.fd_lens))
        try:
            result = backward_fn(ctx, *_unflatten(grads, ctx.fd_out_lens))
        finally:
            ctx.needs_input_grad = needs
        result = result if type(result) is tuple else (result,)
        # torch's wrapper checks this structure too: a gradient must not shift onto another input
        if len(result) != len(ctx.fd_lens) or any(
            n >= 0 and r is not None and len(r) != n for r, n in zip(result, ctx.fd_lens)
        ):
            raise RuntimeError(f"{name}: backward returned {len(result)} gradients of the wrong structure")
        return (None, *_flatten(result, ctx.fd_lens))

    # named at creation: autograd names the graph node after the class (Eager_fastdistill_kd_lossBackward)
    return type(
        f"Eager_{name.replace('::', '_')}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward), "list_returns": list_returns},
    )


def _flatten(values, lens: tuple[int, ...]) -> list:
    """``values`` with each entry of ``lens[i] >= 0`` (a Tensor[], or its gradients: a list, or one None for all)
    spliced in."""
    flat = []
    for v, n in zip(values, lens):
        if n >= 0:
            flat.extend([None] * n if v is None else v)
        else:
            flat.append(v)
    return flat


def _unflatten(flat, lens: tuple[int, ...]) -> list:
    """The inverse of :func:`_flatten`: ``lens[i] >= 0`` entries gathered back into lists."""
    out, i = [], 0
    for n in lens:
        if n < 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i : i + n]))
            i += n
    return out


def call(op, args: tuple) -> Any:
    """``op(*args)`` (``torch.ops.fastdistill.<op>``, or a custom op's ``CustomOpDef``), through a plain
    autograd.Function in eager mode (the module docstring). Anything else (a test's spy) is called as it is."""
    op = op.default if isinstance(op, torch._ops.OpOverloadPacket) else getattr(op, "_opoverload", op)
    if not isinstance(op, torch._ops.OpOverload):
        return op(*args)
    grad = _plain_eager(args)
    if grad is None or op._schema.name not in AUTOGRAD:
        return op(*args)
    if not grad:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    name = op._schema.name
    if name in SPLITS:  # the op below autograd, then one graph node per output
        impl = AUTOGRAD[name][2]
        with torch._C._AutoDispatchBelowAutograd():
            out = (impl if impl is not None else op)(*args)
        return SPLITS[name](args, out)
    fn = _FUNCTIONS.get(name)
    if fn is None:
        fn = _FUNCTIONS[name] = _function(op)
    # a Tensor[] argument: its tensors spliced into the Function's inputs (autograd sees only top-level tensors);
    # an empty list too (none spliced), as the ops' backward answers it with an empty list (registration._grads)
    lens = tuple(len(a) if type(a) in (list, tuple) and (not a or isinstance(a[0], torch.Tensor)) else -1
                 for a in args)  # fmt: skip
    out = fn.apply(lens, *_flatten(args, lens))
    # the one Tensor[] return (kd_loss: a gradient per teacher) holds what the other returns leave of the flat output
    k = len(out) - sum(not is_list for is_list in fn.list_returns)
    return tuple(_unflatten(out, tuple(k if is_list else -1 for is_list in fn.list_returns)))
