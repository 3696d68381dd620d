"""The math of every fastdistill op in plain PyTorch: the specification in code (SPEC §1).

Readable over fast: this module materialises whatever it likes ([K, N, V] probabilities included), works in
float64 when given float64, and gets its gradients from autograd. Every other backend is tested against it.
Inputs here are already validated and flattened by :mod:`fastdistill.functional`:

* ``student``: [N, V] logits; ``teachers``: a list of K tensors [N, V];
* ``teacher_weights``: [K, N], non-negative, each column summing to 1 (or None: uniform);
* ``labels``: int64 [N] or None; ``sample_weight``: [N] or None; ``denominator``: 0-dim or None.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import divergences

DIVERGENCES = divergences.NAMES  # the table: fastdistill/ops/divergences.py
ENSEMBLES = ("prob_mean", "logit_mean", "loss_mean")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32: the dtype of the loss and of all accumulation."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _xlogr(x: Tensor, log_x: Tensor, log_y: Tensor) -> Tensor:
    """x * (log x - log y) with 0 * log 0 = 0 (and a gradient that stays finite where x = 0). Only x == 0 is
    special: a NaN x (from a NaN or +inf logit) gives NaN, never a silent 0."""
    zero = x == 0
    safe_log_x = torch.where(zero, torch.zeros_like(log_x), log_x)
    safe_log_y = torch.where(zero, torch.zeros_like(log_y), log_y)
    return torch.where(zero, torch.zeros_like(x), x * (safe_log_x - safe_log_y))


def _abs(d: Tensor) -> Tensor:
    """|d| with torch.abs's subgradient sign(d) (0 at 0), except that a NaN d has a NaN gradient (torch.abs gives
    it 0): a row with a NaN input has a NaN gradient on every backend."""
    sign = torch.sign(d) + (d - d)  # d - d: 0 for finite d, NaN for NaN
    return d * sign.detach()


def _linked(x: Tensor, *others: Tensor) -> Tensor:
    """x, with an edge to each of ``others`` that adds 0 and passes back a zero gradient: where x's value does not
    depend on an input (pure CE, alpha = 1), backward still reaches it with zeros, as on the fused backends, not
    torch's "does not require grad". The sum of none of its elements, not 0 * other: 0 * inf would be a nan."""
    for o in others:
        if o.requires_grad:
            x = x + o.flatten()[:0].sum().to(x.dtype)
    return x


def _log_mix(log_a: Tensor, log_b: Tensor, wa: float) -> Tensor:
    """log(wa * exp(log_a) + (1 - wa) * exp(log_b)), exact for wa in [0, 1] and -inf inputs."""
    parts = []
    if wa > 0:
        parts.append(log_a + math.log(wa))
    if wa < 1:
        parts.append(log_b + math.log1p(-wa))
    if len(parts) == 1:
        return _linked(parts[0], log_b if wa == 1 else log_a)
    stacked = torch.stack(parts)
    dead = torch.isneginf(stacked).all(0)  # both -inf: keep the gradient finite, the value -inf
    return torch.where(dead, -math.inf, torch.logsumexp(torch.where(dead, 0.0, stacked), dim=0))


def divergence(log_p: Tensor, log_q: Tensor, kind: str, params: Sequence[float] = ()) -> Tensor:
    """D(P, Q) per row, from log-probabilities [N, V] -> [N] (SPEC §1 "Divergence"). ``params``: the divergence's
    parameter vector, in the order of its entry in :mod:`fastdistill.ops.divergences` (jsd: beta; skew_*: skew)."""
    spec = divergences.get(kind)
    if len(params) != len(spec.params):
        raise ValueError(f"divergence {kind!r} takes parameters {[p.name for p in spec.params]}, got {list(params)}")
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":  # sum P log(P / Q)
        terms = _xlogr(p, log_p, log_q)
    elif kind == "reverse_kl":  # sum Q log(Q / P)
        terms = _xlogr(q, log_q, log_p)
    elif kind == "jsd":  # beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q
        (beta,) = params
        log_m = _log_mix(log_p, log_q, beta)
        terms = beta * _xlogr(p, log_p, log_m) + (1 - beta) * _xlogr(q, log_q, log_m)
    elif kind == "tvd":  # 1/2 sum |P - Q|
        terms = 0.5 * _abs(p - q)
    elif kind == "skew_kl":  # KL(P || a P + (1 - a) Q)
        (skew,) = params
        terms = _xlogr(p, log_p, _log_mix(log_p, log_q, skew))
    elif kind == "skew_reverse_kl":  # KL(Q || (1 - a) P + a Q)
        (skew,) = params
        terms = _xlogr(q, log_q, _log_mix(log_q, log_p, skew))
    else:  # pragma: no cover (a name of the table without a branch here: tests/test_divergence_table.py)
        raise NotImplementedError(f"the reference has no branch for divergence {kind!r}")
    return terms.sum(-1)


def _weights(teacher_weights: Tensor | None, k: int, n: int, dtype: torch.dtype, device) -> Tensor:
    if teacher_weights is None:
        return torch.full((k, n), 1.0 / k, dtype=dtype, device=device)
    return teacher_weights.to(dtype)


def teacher_log_probs(teachers: list[Tensor], temperature: float, dtype: torch.dtype, w: Tensor) -> Tensor:
    """log P_k = log_softmax(t_k / T) for each teacher: [K, N, V]. Where a teacher's weight is 0 it is dropped:
    log P_k = -inf, whatever its logits (an all -inf row included), with a zero gradient."""
    out = []
    for t, wk in zip(teachers, w):
        on = wk[:, None] > 0
        log_p = torch.log_softmax(torch.where(on, t.to(dtype), 0.0) / temperature, dim=-1)
        out.append(torch.where(on, log_p, -math.inf))
    return torch.stack(out)


def ensemble_log_target(
    teachers: list[Tensor], temperature: float, ensemble: str, teacher_weights: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """log P of the single ensembled target, [N, V] ("prob_mean" or "logit_mean")."""
    k, n = len(teachers), teachers[0].shape[0]
    w = _weights(teacher_weights, k, n, dtype, teachers[0].device)  # [K, N]
    if ensemble == "prob_mean":  # P = sum_k w_k P_k, its log as a log-sum-exp (never log of a sum of probs)
        log_wp = torch.log(w)[..., None] + teacher_log_probs(teachers, temperature, dtype, w)
        # where every teacher has probability 0 (padded vocabulary) keep the gradient finite: log P = -inf there
        dead = torch.isneginf(log_wp).all(0)
        mixed = torch.logsumexp(torch.where(dead, 0.0, log_wp), dim=0)
        return torch.where(dead, -math.inf, mixed)
    if ensemble == "logit_mean":  # P = softmax(sum_k w_k t_k / T); w_k = 0 drops the teacher (even its -inf)
        pooled = sum(torch.where(w[j, :, None] > 0, w[j, :, None] * t.to(dtype), 0.0) for j, t in enumerate(teachers))
        return torch.log_softmax(pooled / temperature, dim=-1)
    raise ValueError(f"ensemble {ensemble!r} has no single target (use 'prob_mean' or 'logit_mean')")


def kd_loss(
    student: Tensor,
    teachers: list[Tensor],
    *,
    teacher_weights: Tensor | None,
    labels: Tensor | None,
    sample_weight: Tensor | None,
    denominator: Tensor | None,
    divergence_kind: str,
    ensemble: str,
    temperature: float,
    kd_scale: float,
    ce_weight: float,
    div_params: Sequence[float],
    ignore_index: int,
    reduce: bool,
) -> Tensor:
    """The fused KD loss (SPEC §1) on flattened inputs. Returns a 0-dim loss (reduce) or per-row losses [N].

    Row loss l_i = kd_scale * D_i + ce_weight * CE_i, with kd_scale = (1 - ce_weight) * (T^2 or 1); weighted
    l'_i = w_i l_i; rows whose label is ignore_index, or whose weight is 0, give exactly 0.
    """
    dtype = compute_dtype(student, *teachers)
    n = student.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=student.device)
    if labels is not None:
        keep = labels != ignore_index
    if sample_weight is not None:
        keep = keep & (sample_weight > 0)
    # Skipped rows give exactly 0 and a zero gradient: neutralise their logits first, so nothing in them (-inf,
    # nan) can reach the gradient through 0 * inf.
    student = torch.where(keep[:, None], student, 0.0)
    teachers = [torch.where(keep[:, None], t, 0.0) for t in teachers]
    log_q = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    if ensemble == "loss_mean" and len(teachers) > 1:  # each teacher its own target: D = sum_k w_k D(P_k, Q)
        w = _weights(teacher_weights, len(teachers), n, dtype, student.device)
        log_pk = teacher_log_probs(teachers, temperature, dtype, w)
        # A teacher with weight 0 is dropped: its rows' target is replaced by Q itself (D = 0, a finite gradient),
        # since D(-inf, Q) is inf for reverse KL and 0 * inf would be a nan gradient even through the where.
        d = sum(torch.where(w[j] > 0, w[j] * divergence(torch.where(w[j, :, None] > 0, lp, log_q.detach()), log_q,
                                                         divergence_kind, div_params), 0.0)
                for j, lp in enumerate(log_pk))  # fmt: skip
    else:
        log_p = ensemble_log_target(teachers, temperature, ensemble if len(teachers) > 1 else "prob_mean",
                                    teacher_weights, dtype)
        d = divergence(log_p, log_q, divergence_kind, div_params)
    # ce_weight = 1: pure CE, even where D = inf (the teachers linked: their gradient is 0, not absent; the student
    # too, for a codistill direction of weight 0 without CE: a zero gradient, as on the fused backends)
    rows = kd_scale * d if kd_scale != 0 else _linked(torch.zeros_like(d), student, *teachers)

    if ce_weight > 0:  # hard-label cross-entropy at T = 1, from log_softmax: (s - max) - log sum, never lse - s
        safe = torch.where(keep, labels, 0)
        ce = -torch.log_softmax(student.to(dtype), dim=-1).gather(-1, safe[:, None]).squeeze(-1)
        rows = rows + ce_weight * ce
    if sample_weight is not None:
        rows = rows * sample_weight.to(dtype)
    rows = torch.where(keep, rows, torch.zeros_like(rows))
    if not reduce:
        return rows
    total = rows.sum()
    return total if denominator is None else total / denominator.to(dtype)


def codistill_loss(
    a: Tensor,
    b: Tensor,
    *,
    labels: Tensor | None,
    sample_weight: Tensor | None,
    denominator: Tensor | None,
    divergence_kind: str,
    temperature: float,
    kd_scale: float,
    weight_ab: float,
    weight_ba: float,
    hard_a: float,
    hard_b: float,
    div_params: Sequence[float],
    ignore_index: int,
    reduce: bool,
) -> tuple[Tensor, Tensor]:
    """Co-distillation of two models (a, b) on flattened [N, V] logits: each is a student of the other, whose
    distribution is a constant target (stop-gradient). Returns (loss_a, loss_b), 0-dim or [N]:

        loss_a = hard_a * CE(a) + kd_scale * weight_ba * D(P_b, Q_a)      (b teaches a)
        loss_b = hard_b * CE(b) + kd_scale * weight_ab * D(P_a, Q_b)      (a teaches b)

    per row, weighted, skipped and reduced exactly as :func:`kd_loss` (which computes each side).
    """
    common = dict(
        teacher_weights=None, labels=labels, sample_weight=sample_weight, denominator=denominator,
        divergence_kind=divergence_kind, ensemble="prob_mean", temperature=temperature, div_params=div_params,
        ignore_index=ignore_index, reduce=reduce,
    )  # fmt: skip
    loss_a = kd_loss(a, [b.detach()], kd_scale=kd_scale * weight_ba, ce_weight=hard_a, **common)
    loss_b = kd_loss(b, [a.detach()], kd_scale=kd_scale * weight_ab, ce_weight=hard_b, **common)
    return loss_a, loss_b


# ---------------------------------------------------------------------------------------------------------------------
# MI-alpha (SPEC §2, §6). Inputs are validated by fastdistill.functional.mi_alpha: student, teacher [N, D] (N >= 2),
# log_baseline a float or a Tensor [N].
# ---------------------------------------------------------------------------------------------------------------------

CRITICS = ("dot", "cosine")
ANCHORS = ("student", "teacher")  # the side the critic matrix's rows are (functional.mi_alpha's `anchor`)


def mi_scores(student: Tensor, teacher: Tensor, critic: str, temperature: float) -> Tensor:
    """The critic matrix S [N, N], S_ij = <v_i, u_j> / T (row i: teacher example i; the diagonal: positive pairs),
    with u = student, v = teacher, both L2-normalised first for ``critic="cosine"``; float32 or float64."""
    dtype = compute_dtype(student, teacher)
    u, v = student.to(dtype), teacher.to(dtype)
    if critic == "cosine":
        u, v = torch.nn.functional.normalize(u, dim=-1), torch.nn.functional.normalize(v, dim=-1)
    off = torch.autocast(u.device.type, enabled=False) if u.device.type != "meta" else contextlib.nullcontext()
    with off:  # in that dtype even inside autocast (it would take bf16)
        return (v @ u.T) / temperature


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler's recipe)."""
    near = x > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))  # fmt: skip


def mi_alpha(
    student: Tensor,
    teacher: Tensor,
    *,
    alpha: float,
    log_baseline: float | Tensor,
    critic: str,
    temperature: float,
) -> Tensor:
    """The interpolated bound I_alpha of Poole et al. (2019) on a batch, as Distiller uses it (SPEC §6).

    student, teacher: [N, D]; log_baseline: float or [N] (a_i, one per teacher row). Returns the 0-dim estimate in
    nats (float64 for float64 inputs, else float32), differentiable by autograd in all three.
    """
    s = mi_scores(student, teacher, critic, temperature)
    n = s.shape[0]
    a = torch.as_tensor(log_baseline, dtype=s.dtype, device=s.device).expand(n)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)
    # Leave-one-out InfoNCE baseline L_ij = log(1/(N-1) sum_{k != j} exp(S_ik)). Off the row's largest score and
    # the diagonal it is l_i + log(1 - exp(S_ij - l_i)) - log(N-1) (l_i = logsumexp_k S_ik; well conditioned, as
    # p_ij <= 1/2 there); at those two columns the sum without them is taken directly: 1 - p would cancel.
    lse = torch.logsumexp(s, dim=1, keepdim=True)
    star = s.argmax(dim=1, keepdim=True)
    cols = torch.arange(n, device=s.device)
    direct = ~off | (cols[None, :] == star)
    loo = lse + _log1mexp(torch.where(direct, -1.0, (s - lse).clamp(max=0.0)))
    loo_diag = torch.logsumexp(s.masked_fill(~off, -math.inf), dim=1)
    loo_star = torch.logsumexp(s.masked_fill(cols[None, :] == star, -math.inf), dim=1)
    loo = torch.where(~off, loo_diag[:, None], torch.where(direct, loo_star[:, None], loo)) - math.log(n - 1)
    # Interpolated baseline B_ij = log(alpha exp(L_ij) + (1 - alpha) exp(a_i)).
    b = _log_mix(loo, a[:, None].expand(n, n), alpha)
    # Means over the N(N-1) off-diagonal cells as masked sums: a boolean index would be a data-dependent shape
    # (aten.nonzero: a host sync on a GPU, a graph break under torch.compile, which benchmarks this code).
    pairs = n * (n - 1)
    joint = torch.where(off, s.diagonal()[:, None] - b, 0.0).sum() / pairs
    # (the diagonal is masked before exp: exp(S_ii - B_ii) may overflow, and inf * 0 would be a nan gradient)
    marginal = torch.exp((s - b.diagonal()[:, None]).masked_fill(~off, -math.inf)).sum() / pairs
    return 1.0 + joint - marginal
