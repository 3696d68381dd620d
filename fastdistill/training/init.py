"""Moved to :mod:`fastdistill.methods.init`; the old path stays an alias of it (``sys.modules``)."""

import sys

from ..methods import init

sys.modules[__name__] = init
