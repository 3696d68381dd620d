"""Applications built on the training loop and the methods: ``demo.py`` is ``fastdistill demo`` (``make demo``),
ensemble distillation on scikit-learn's digits, whose factories also serve ``examples/digits.yaml``.

:func:`single_thread` and :func:`paired_ci` are shared by the demo and the experiments in ``examples/``.
"""

from ._common import paired_ci, single_thread

__all__ = ["paired_ci", "single_thread"]
