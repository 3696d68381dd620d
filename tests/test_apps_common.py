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


def test_load_script_forgets_a_script_that_failed_and_names_a_non_python_path(tmp_path, monkeypatch):
    """A script that raised stayed in sys.modules half-run: the next load_script returned it without its names. A
    path that is not a .py file was an AttributeError on None."""
    import sys

    from fastdistill.apps import load_script

    script = tmp_path / "flaky.py"
    script.write_text("import os\nif not os.environ.get('FD_FLAKY_OK'):\n    raise RuntimeError('boom')\nX = 1\n")
    monkeypatch.delenv("FD_FLAKY_OK", raising=False)
    with pytest.raises(RuntimeError, match="boom"):
        load_script(script, "fd_flaky_test")
    assert "fd_flaky_test" not in sys.modules
    monkeypatch.setenv("FD_FLAKY_OK", "1")
    try:
        assert load_script(script, "fd_flaky_test").X == 1
    finally:
        sys.modules.pop("fd_flaky_test", None)
    (tmp_path / "notes.txt").write_text("X = 1\n")
    with pytest.raises(ImportError, match="expected a .py file"):
        load_script(tmp_path / "notes.txt", "fd_notes_test")
