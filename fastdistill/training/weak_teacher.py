"""Moved to :mod:`fastdistill.methods.weak_teacher`; the old path stays an alias of it (``sys.modules``)."""

import sys

from ..methods import weak_teacher

sys.modules[__name__] = weak_teacher
