"""fastdistill.apps helpers the experiments share: seeds mapped here or in spawned processes, paired intervals."""

import math

import pytest

from fastdistill.apps import map_seeds, paired_ci


def test_map_seeds_here_and_in_processes():
    assert map_seeds(math.factorial, [3, 4, 5]) == [6, 24, 120]
    assert map_seeds(math.factorial, [3, 4, 5], jobs=2) == [6, 24, 120]  # spawned, order kept


def test_paired_ci():
    assert paired_ci([1.0], [0.0]) is None
    mean, lo, hi = paired_ci([1.0, 2.0, 3.0], [0.0, 0.5, 1.0])
    assert mean == 1.5 and lo < mean < hi
    assert hi - mean == pytest.approx(4.30 * 0.5 / math.sqrt(3))  # t(2) quantile, stdev of (1, 1.5, 2) = 0.5
    _, lo99, hi99 = paired_ci([1.0, 2.0, 3.0], [0.0, 0.5, 1.0], level=0.99)  # scipy's t quantile
    assert hi99 - mean == pytest.approx(9.925 * 0.5 / math.sqrt(3), rel=1e-3)
