"""Moved to :mod:`fastdistill.apps.demo`; the old path stays an alias of it (``sys.modules``)."""

import sys

from ..apps import demo

sys.modules[__name__] = demo
