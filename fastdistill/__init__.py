"""fastdistill: fused, exact knowledge-distillation losses for PyTorch.

Public API: :func:`kd_loss`, :class:`KDLoss`, :func:`ensemble_soft_targets` (logit distillation);
:func:`codistill_loss`, :class:`CodistillLoss` (two models distilling into each other); :func:`mi_alpha`,
:class:`MIAlphaLoss` (representation distillation); :func:`mbr_consensus` (sequence-level ensembling). Backends and
their dispatch live in :mod:`fastdistill.ops`; the math of every op, in plain PyTorch, in
:mod:`fastdistill.ops.reference`.
"""

from .functional import CodistillLosses, codistill_loss, ensemble_soft_targets, kd_loss, mi_alpha
from .fused_linear import FusedLinearKDLoss, LoRATerm, TeacherHead, fused_linear_kd_loss
from .modules import CodistillLoss, KDLoss, MIAlphaLoss
from .ops import extension as _extension
from .ops import registration as _registration  # noqa: F401  (fake kernels + autograd of the C++ ops)
from .sequence import mbr_consensus, mbr_select, token_f1

__all__ = [
    "kd_loss",
    "KDLoss",
    "ensemble_soft_targets",
    "codistill_loss",
    "CodistillLoss",
    "CodistillLosses",
    "mi_alpha", "MIAlphaLoss", "extension_available",
    "fused_linear_kd_loss", "FusedLinearKDLoss", "TeacherHead", "LoRATerm",
    "mbr_consensus", "mbr_select", "token_f1"]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)


def extension_available() -> bool:
    """True when the compiled kernels (``fastdistill._C``) loaded; else every op runs on the reference backend."""
    return _extension.available()
