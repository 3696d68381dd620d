"""Sequence-level ensembling: one consensus output per input from K teachers' candidates, by minimum Bayes risk.

Token-level ensembles (``prob_mean``, ``logit_mean``) average the teachers' next-token distributions; decoded, they
can produce an output none of the teachers would (the average of two modes is often neither). For structured
outputs (generation, parsing) the alternative is to let each teacher produce its own output and keep, per input,
the one the teachers agree with most: the minimum-Bayes-risk (MBR) candidate under a similarity ``sim``, the one of
highest expected similarity to a teacher's output drawn with probabilities w (uniform by default),

    k*_i = argmax_k  sum_l w_l sim(c_ki, c_li)     (l = k included: sim(c_ki, c_ki), computed, not taken as 1),

and to distil that one output per input (``mbr_consensus``) rather than the union of all K (each teacher's output
as its own training example), which makes the student hedge between the teachers' modes.

Candidates are given teacher-major, ``candidates[k][i]`` = teacher k's output for input i (the order of the loop's
``teachers``), as sequences of tokens (lists, tuples or 1-D tensors; any hashable tokens). Ties go to the lowest
teacher index, so the choice is deterministic. With K = 2 and equal weights the two candidates tie (sim is symmetric,
sim(c, c) = 1 for :func:`token_f1`), so MBR picks teacher 0: use K >= 3, or weights (the heavier teacher's candidate
then wins unless the two agree). A teacher of weight 0 is no evidence, but its candidate can still be chosen when the
others agree with it most. Compare what the teachers produced, not the prompt they share (which would pull every
similarity towards 1). Example, with the loop (``outputs[k]``: teacher k's prompts + greedy continuations [M, P + L],
padded with ``pad_id`` after the end of sequence)::

    best = mbr_select([o[:, P:] for o in outputs], functools.partial(token_f1, ignore={pad_id}))
    seqs = torch.stack([outputs[k][i] for i, k in enumerate(best)])            # one sequence per prompt
    mask = (seqs != pad_id).long()
    labels = seqs.masked_fill(mask == 0, -100)                                 # padding is no target,
    labels[:, :P] = -100                                                       # nor is the prompt
    DistillationLoop(student, shift_labels=True, ...).fit(
        ArrayDataset(input_ids=seqs, attention_mask=mask, labels=labels), max_steps=...)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, TypeVar, overload

import torch
from torch import Tensor

T = TypeVar("T")
Similarity = Callable[[Any, Any], float]


def _tokens(seq: Any, ignore: Collection[Hashable]) -> list[Hashable]:
    if isinstance(seq, Tensor):
        if seq.dim() != 1:
            raise ValueError(f"a candidate tensor must be 1-D (one sequence of tokens), got shape {tuple(seq.shape)}")
        seq = seq.tolist()
    elif isinstance(seq, str):
        seq = seq.split()
    # 0-d tensor tokens (a row's unbind()) hash by identity: compared by their values instead
    seq = [t.item() if isinstance(t, Tensor) and t.dim() == 0 else t for t in seq]
    return [t for t in seq if t not in ignore] if ignore else seq


def token_f1(a: Any, b: Any, ignore: Collection[Hashable] = ()) -> float:
    """Bag-of-tokens F1 of two sequences (SQuAD's answer F1): 2 |a & b| / (|a| + |b|) with multiset intersection;
    1.0 for two empty sequences, 0.0 when only one is empty. Sequences: lists / tuples of tokens, 1-D tensors, or
    strings (split on whitespace); tokens in ``ignore`` (padding, end of sequence) are dropped first."""
    ta, tb = _tokens(a, ignore), _tokens(b, ignore)
    if not ta and not tb:
        return 1.0
    if not ta or not tb:
        return 0.0
    common = sum((Counter(ta) & Counter(tb)).values())
    return 2.0 * common / (len(ta) + len(tb))


def _check(candidates: Sequence[Sequence[Any]] | Tensor,
           weights: Sequence[float] | Tensor | None) -> tuple[int, int, list, list[float]]:  # fmt: skip
    """(K, M, the K candidate sequences, the K weights as floats, uniform by default), or a clear error."""
    if isinstance(candidates, Tensor):
        if candidates.dim() != 3:
            raise ValueError(f"candidates as a tensor must be [K, M, L] (teacher, input, token), got shape "
                             f"{tuple(candidates.shape)}")  # fmt: skip
        candidates = list(candidates.unbind(0))
    k = len(candidates)
    if k < 1:
        raise ValueError("candidates must hold at least one teacher's outputs (candidates[k][i], teacher-major)")
    for j, c in enumerate(candidates):
        if isinstance(c, str | bytes) or not isinstance(c, Sequence | Tensor):
            # (a flat list of K strings would read each character as an input)
            raise TypeError(f"candidates[{j}] must be teacher {j}'s M outputs (a sequence, one per input; "
                            f"candidates[k][i], teacher-major), got {type(c).__name__} {c!r:.60}")  # fmt: skip
    m = len(candidates[0])
    for j, c in enumerate(candidates):
        if len(c) != m:
            raise ValueError(f"candidates[{j}] has {len(c)} outputs, candidates[0] has {m}: every teacher needs one "
                             "output per input (teacher-major: candidates[k][i])")  # fmt: skip
    if weights is None:
        return k, m, list(candidates), [1.0] * k
    w = [float(x) for x in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(w) != k:
        raise ValueError(f"weights must have one entry per teacher (K = {k}), got {len(w)}")
    if any(not (x >= 0) or x == float("inf") for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w}")
    return k, m, list(candidates), w


def mbr_select(candidates: Sequence[Sequence[Any]] | Tensor, similarity: Similarity = token_f1,
               weights: Sequence[float] | Tensor | None = None) -> list[int]:  # fmt: skip
    """For each input i, the teacher k whose candidate ``candidates[k][i]`` has the highest weighted similarity to
    all K candidates for i, its own included: sum_l w_l sim(c_ki, c_li) (see the module docstring); ties to the
    lowest k.

    Args:
        candidates: K sequences of M outputs each (teacher-major), or a [K, M, L] tensor.
        similarity: ``sim(a, b) -> float``, symmetric, higher = more alike (default :func:`token_f1`); best
            normalised (sim(c, c) the same for every c, as token F1's 1): an unnormalised one (a shared-token count)
            makes the own-candidate term favour candidates most like themselves, the long ones.
        weights: optional [K] non-negative teacher weights w_l (not all 0), uniform by default.

    Returns:
        M teacher indices.
    """
    k, m, cands, w = _check(candidates, weights)
    top = max(w)
    w = [x / top for x in w]  # the argmax is scale-free; weights near 1e308 overflowed the scores to inf (ties)
    if k == 1:
        return [0] * m
    chosen = []
    for i in range(m):
        sims = [[0.0] * k for _ in range(k)]
        for a in range(k):
            for b in range(a, k):
                sims[a][b] = sims[b][a] = float(similarity(cands[a][i], cands[b][i]))
        scores = [sum(w[b] * sims[a][b] for b in range(k)) for a in range(k)]
        # exact ties go to the lowest index: sums of the same terms in another order differ in the last bits, so
        # a score must beat the best by more than rounding (relative to the scores' scale) to take its place
        tol = 1e-9 * max(1.0, *(abs(s) for s in scores))
        best = 0
        for a in range(1, k):
            if scores[a] > scores[best] + tol:
                best = a
        chosen.append(best)
    return chosen


@overload
def mbr_consensus(candidates: Tensor, similarity: Similarity = ...,
                  weights: Sequence[float] | Tensor | None = ...) -> list[Tensor]: ...  # fmt: skip
@overload
def mbr_consensus(candidates: Sequence[Sequence[T]], similarity: Similarity = ...,
                  weights: Sequence[float] | Tensor | None = ...) -> list[T]: ...  # fmt: skip
def mbr_consensus(candidates: Sequence[Sequence[T]] | Tensor, similarity: Similarity = token_f1,
                  weights: Sequence[float] | Tensor | None = None) -> list[T] | list[Tensor]:  # fmt: skip
    """The MBR consensus output per input: ``candidates[mbr_select(...)[i]][i]`` for each i (M outputs, each as
    given: a tensor row of a [K, M, L] tensor stays a tensor). Arguments as for :func:`mbr_select`."""
    if isinstance(candidates, Tensor):
        idx = torch.tensor(mbr_select(candidates, similarity, weights), dtype=torch.long, device=candidates.device)
        return list(candidates[idx, torch.arange(candidates.shape[1], device=candidates.device)].unbind(0))
    return [candidates[k][i] for i, k in enumerate(mbr_select(candidates, similarity, weights))]
