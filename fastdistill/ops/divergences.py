"""The divergence table, the one Python list of divergences (its C++ twin: ``FD_DIVERGENCES`` in
``csrc/common/kd_math.h``; ``tests/test_divergence_table.py`` holds the two to each other).

Everything that names, numbers or checks a divergence reads it: the functional API's argument checks, the config's
choices, the Triton kernels' codes and closed-form switch, the parameter vector the kernels take, and the tests.
Adding a divergence: one entry here and in ``FD_DIVERGENCES``, one case in ``kd_math.h``'s ``divergence_terms``,
one branch in :func:`fastdistill.ops.reference.divergence` and in the Triton ``_terms``, and tests (CONTRIBUTING.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """A divergence's hyper-parameter: its keyword in the API, default, and admissible interval."""

    name: str
    default: float
    low: float
    high: float
    low_open: bool
    high_open: bool
    doc: str


def _unbounded(params: Sequence[float]) -> None:
    return None


@dataclass(frozen=True)
class Divergence:
    """One row of the table. ``code``: the kernels' number for it (its position, as in the C++ enum);
    ``closed_form``: the student aggregate sum_v Q dphi/dQ is -1, so the student gradient Q - P needs no second
    sweep (kd_math.h's ``student_aggregate_is_minus_one``); ``params``: its hyper-parameters, in the order of the
    parameter vector the kernels take; ``log_target``: its terms weigh log P by Q (reverse KL), so they depend on
    log P where P underflows in float32 and Q does not, and a kernel must form log P in log space (the Triton
    mixture: a log-sum-exp over the teachers; without this flag the log of the float32 sum, whose underflow the
    terms do not see, as every term of the others carries a factor P or is bounded as P -> 0); ``grad_bound``:
    from the parameter vector, a bound on |dD/dz_v| over all distributions (z the student's tempered logits,
    Q = softmax(z)), or None where there is none (reverse KL: Q_v log(Q_v / P_v) grows without bound as P_v -> 0).
    With a = dD/dQ, dD/dz_v = Q_v (a_v - sum_u Q_u a_u): kl gives Q - P; tvd, jsd and skew_kl keep Q_v |a_v| and
    sum_u Q_u |a_u| under 1 (jsd: (1 - beta) log(Q / M) <= 1/e, and Q log Q >= -1/e; skew_kl: Q_u |a_u| <= P_u);
    skew_reverse_kl: Q / M <= 1 / skew gives log(1 / skew) + 2 (tests/test_divergence_table.py probes them)."""

    name: str
    code: int
    formula: str
    params: tuple[Param, ...] = ()
    closed_form: bool = False
    log_target: bool = False
    grad_bound: Callable[[Sequence[float]], float | None] = _unbounded


BETA = Param("beta", 0.5, 0.0, 1.0, True, True, "jsd: the teacher's weight in the mixture M = beta P + (1 - beta) Q")
SKEW = Param("skew", 0.1, 0.0, 1.0, False, True, "skew_*: the mixing weight of the skewed target")


def _one(params: Sequence[float]) -> float:
    return 1.0


def _skew_reverse_bound(params: Sequence[float]) -> float | None:
    (skew,) = params
    return math.log(1.0 / skew) + 2.0 if skew > 0 else None


_TABLE = (  # name, formula, params, closed_form, log_target, grad_bound
    ("kl", "sum P log(P / Q)", (), True, False, _one),
    ("reverse_kl", "sum Q log(Q / P)", (), False, True, _unbounded),
    ("jsd", "beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q", (BETA,), False, False, _one),
    ("tvd", "1/2 sum |P - Q|", (), False, False, _one),
    ("skew_kl", "KL(P || skew P + (1 - skew) Q)", (SKEW,), False, False, _one),
    # skew = 0 is reverse KL
    ("skew_reverse_kl", "KL(Q || (1 - skew) P + skew Q)", (SKEW,), False, True, _skew_reverse_bound),
)
DIVERGENCES: dict[str, Divergence] = {
    name: Divergence(name, code, formula, params, closed, log_target, bound)
    for code, (name, formula, params, closed, log_target, bound) in enumerate(_TABLE)
}
NAMES: tuple[str, ...] = tuple(DIVERGENCES)
# The keyword hyper-parameters of every divergence (the API takes each as a keyword with its default).
PARAMS: dict[str, Param] = {p.name: p for d in DIVERGENCES.values() for p in d.params}
# The most parameters one divergence takes (kd_math.h's kMaxDivParams; the kernels hold that many).
MAX_PARAMS = 1
assert max(len(d.params) for d in DIVERGENCES.values()) <= MAX_PARAMS


def get(name: str) -> Divergence:
    """The table's row for ``name``, or a ValueError naming the argument and the choices."""
    if not isinstance(name, str) or name not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, NAMES))}; got {name!r}")
    return DIVERGENCES[name]


def param_vector(name: str, values: dict[str, float]) -> list[float]:
    """The parameter vector of divergence ``name`` as the kernels take it: its parameters' values in table order
    (``values`` maps every keyword of :data:`PARAMS`; the others are ignored)."""
    return [float(values[p.name]) for p in get(name).params]


def kernel_params(div_params: Sequence[float]) -> list[float]:
    """The parameter vector as the Triton kernels read it: per parameter w, (w, log w, log(1 - w)) (log 0 = -inf is
    intended, as in kd_math.h's make_div_params), zero-padded to MAX_PARAMS triples."""

    def log(x: float) -> float:
        return math.log(x) if x > 0 else -math.inf

    out: list[float] = []
    for w in div_params:
        out += [float(w), log(w), log(1.0 - w)]
    return out + [0.0] * (3 * MAX_PARAMS - len(out))
