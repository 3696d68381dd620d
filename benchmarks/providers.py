"""Benchmark providers: implementations of the same loss, forward KL to the prob_mean ensemble of K teachers.

``make(K, temperature)`` returns ``fn(student [N, V], teachers [K, N, V]) -> 0-dim loss`` (T^2-scaled, mean over rows).
fastdistill's own providers (``DIVERGENCE_PROVIDERS``) also take ``divergence=`` (any of the library's, with its
default parameters); the others are the five-line forward KL only: "eager" / "compile" upcast 16-bit logits to float32
inside (what fastdistill computes in; the loss float32), "eager-nocast" / "compile-nocast" run in the logits' dtype.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastdistill
from fastdistill.ops import extension

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kd(backend: str, env: dict[str, str] | None = None) -> Callable[..., LossFn]:
    """fastdistill.kd_loss on ``backend``; ``env``: launch overrides (the CUDA kernel's, which
    csrc/cuda/kd_loss_binding.cpp reads at every call; the Triton kernel's row layout, which kd_loss.py reads at every
    call), set when the provider is made (each benchmark row runs in its own process)."""

    def make(K: int, temperature: float, divergence: str = "kl") -> LossFn:
        os.environ.update(env or {})

        def fn(student: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
            return fastdistill.kd_loss(student, teachers, temperature=temperature, divergence=divergence,
                                       backend=backend)  # fmt: skip

        return fn

    return make


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit logits (float32 and float64 stay): the precision fastdistill's kernels compute in."""
    return torch.promote_types(x.dtype, torch.float32)


def make_eager(K: int, temperature: float, upcast: bool = True) -> LossFn:
    """The loss as a competent user writes it in eager PyTorch: the logits upcast to float32 inside (16-bit inputs),
    so log_softmax, exp and the product run in float32 and the loss is float32, as fastdistill computes it (and as
    the codistill baselines do). ``upcast=False``: every op in the logits' dtype ("eager-nocast"; in bf16 its
    gradient is ~10x further from the float64 truth: 2.5e-2 against 1.7e-3 relative at V = 32768, K = 1)."""

    def fn(student: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        T = temperature
        if upcast:
            student, teachers = student.to(_accumulation_dtype(student)), teachers.to(_accumulation_dtype(teachers))
        log_q = F.log_softmax(student / T, dim=-1)
        log_pk = F.log_softmax(teachers / T, dim=-1)
        log_p = log_pk[0] if K == 1 else torch.logsumexp(log_pk, dim=0) - math.log(K)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T**2

    return fn


def make_liger(K: int, temperature: float) -> LossFn:
    """Liger-Kernel's fused JSD with beta = 0 (forward KL) on log-softmaxed inputs; one teacher only. The keyword is
    ``beta`` (liger-kernel 0.8.5; older releases called it ``jsd_beta``)."""
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=0.0)

    def fn(student: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        T = temperature
        return jsd(F.log_softmax(student / T, dim=-1), F.log_softmax(teachers[0] / T, dim=-1)) * T**2

    return fn


def make_compile(K: int, temperature: float, upcast: bool = True) -> LossFn:
    """``torch.compile`` of the eager loss (default mode, static shapes); ``upcast``: as ``make_eager``'s."""
    return torch.compile(make_eager(K, temperature, upcast), dynamic=False)


def make_eager_nocast(K: int, temperature: float) -> LossFn:
    return make_eager(K, temperature, upcast=False)


def make_compile_nocast(K: int, temperature: float) -> LossFn:
    return make_compile(K, temperature, upcast=False)


PROVIDERS: dict[str, Callable[..., LossFn]] = {
    "cpu": _kd("cpu"),
    "triton": _kd("triton"),
    # the same kernel with one program per row (v2: C = 1), to compare with v3's chunked rows in the same run
    "triton-v2": _kd("triton", {"FASTDISTILL_TRITON_ROW": "v2"}),
    # the CUDA C++ kernel, its launcher's choice of residency (pipelined where it fits); strict: a planned block or
    # cluster the GPU cannot hold is a failed row, not a row that measured the fallback under this name
    "cuda": _kd("cuda", {"FASTDISTILL_CUDA_STRICT": "1"}),
    # v1: a block or cluster per row, never pipelined, to compare with the pipelined kernel in the same run
    "cuda-v1": _kd("cuda", {"FASTDISTILL_CUDA_PIPELINE": "0", "FASTDISTILL_CUDA_STRICT": "1"}),
    # v2 forced: where auto pipelines, the same kernel as "cuda" (a second measurement of it: the run-to-run spread);
    # at V = 128256, K = 4, where auto stays on v1, the pipelined kernel on clusters of 16
    "cuda-v2": _kd("cuda", {"FASTDISTILL_CUDA_PIPELINE": "1", "FASTDISTILL_CUDA_STRICT": "1"}),
    "cuda-global": _kd("cuda", {"FASTDISTILL_CUDA_RESIDENCY": "global"}),  # its fallback, rows read from HBM
    "liger": make_liger,
    "auto": _kd("auto"),
    # the baselines: the five-line loss upcast to float32 (as fastdistill computes); the gates compare with the
    # faster of "compile" and "compile-nocast" where a run measured both (gates.py: COMPILE_VARIANTS)
    "eager": make_eager,
    "compile": make_compile,
    # the same in the logits' dtype (bf16 throughout: less accurate); not in make bench-gpu's list (each row costs a
    # child and a compilation in its slot): run them with --providers to see what the upcast costs
    "eager-nocast": make_eager_nocast,
    "compile-nocast": make_compile_nocast,
    "reference": _kd("reference"),
}


@dataclass(frozen=True)
class Sweep:
    """A provider timed at each of ``settings`` of one launch override, in one child process (what a row costs is
    its start-up; the settings only add their timed steps)."""

    what: str  # the override, for the JSON
    settings: tuple[str, ...]
    make: Callable[[str], Callable[..., LossFn]]  # setting -> provider


SWEEPS = {
    # v3's tiles per chunk (of 1024 columns; the default holds ~16 KB of input: 4 tiles at K = 1, 2 at K = 4, at
    # least cdiv(tiles of the row, SMs / 2)): if the re-reads miss L2, smaller chunks are the first thing to try
    "triton-chunks": Sweep("FASTDISTILL_TRITON_CHUNK_TILES", ("1", "2", "4", "8"),
                           lambda t: _kd("triton", {"FASTDISTILL_TRITON_CHUNK_TILES": t})),
}
PROVIDERS |= {name: sweep.make(sweep.settings[0]) for name, sweep in SWEEPS.items()}
# the ones that take divergence=
DIVERGENCE_PROVIDERS = ("cpu", "triton", "triton-v2", "triton-chunks", "cuda", "cuda-v1", "cuda-v2", "cuda-global",
                        "auto", "reference")


def unavailable_reason(name: str, device: str) -> str | None:
    """Why provider ``name`` cannot run on ``device`` ("cpu" | "cuda"), or None when it can."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})"
    if name == "cpu" and device != "cpu":
        return "the cpu backend runs on CPU tensors only"
    if (name.startswith("triton") or name == "liger") and device != "cuda":
        return f"{name} is benchmarked on CUDA only (on the CPU it would run in Triton's interpreter)"
    if name.startswith("cuda") and device != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if name.startswith("cuda") and not extension.has_kernel("kd_loss", "CUDA"):
        return "fastdistill._C has no CUDA kernel (built without csrc/cuda, or without a CUDA torch)"
    if name == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not importable"
    if name == "cpu" and not fastdistill.extension_available():
        return "fastdistill C++ extension unavailable (fastdistill.extension_available() is False)"
    if device == "cuda" and not torch.cuda.is_available():
        return "CUDA not available"
    return None


def make_inputs(
    N: int, V: int, K: int, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-seed student logits [N, V] (requires grad) and teacher logits [K, N, V] (no grad), drawn on ``device``
    (a CPU draw copied to a GPU took longer than the measurement). On the CPU the values are the same as ever; a
    GPU's generator draws other (equally fixed) values."""
    g = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(N, V, generator=g, device=device).mul_(2).to(dtype).requires_grad_()
    teachers = torch.randn(K, N, V, generator=g, device=device).mul_(2).to(dtype)
    return student, teachers


def fwd_bwd(fn: LossFn, student: torch.Tensor, teachers: torch.Tensor) -> None:
    """One training step of the loss: forward, backward, drop the gradient."""
    fn(student, teachers).backward()
    student.grad = None
