"""Applications built on the training loop and the methods: ``demo.py`` is ``fastdistill demo`` (``make demo``),
ensemble distillation on scikit-learn's digits, whose factories also serve ``examples/digits.yaml``.

:func:`single_thread`, :func:`paired_ci`, :func:`load_script` and :func:`map_seeds` are shared by the demo and the
experiments in ``examples/``.
"""

from ._common import load_script, map_seeds, paired_ci, single_thread

__all__ = ["load_script", "map_seeds", "paired_ci", "single_thread"]
