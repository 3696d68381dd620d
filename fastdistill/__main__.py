"""``python -m fastdistill demo|train|bench``: see :mod:`fastdistill.cli`."""

import sys

from .cli import main

sys.exit(main())
