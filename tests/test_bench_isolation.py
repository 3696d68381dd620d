"""``make test`` runs pytest on tests/ only: this collects benchmarks/test_isolation.py's checks of the benchmarks'
child-process isolation and time budget (CPU, tiny shapes, ~15 s) so that CI runs them too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/ package

from benchmarks.test_isolation import (  # noqa: E402, F401
    test_a_cell_starts_only_with_the_time_its_provider_took,
    test_a_grouped_child_s_clocks_and_deaths_between_cells,
    test_a_grouped_child_starts_a_cell_only_with_the_time_its_last_took,
    test_a_provider_s_cells_share_a_child_and_a_failure_starts_a_fresh_one,
    test_arguments_that_would_fail_every_row_are_refused,
    test_budget_kills_the_running_child_and_skips_the_rest,
    test_crash_becomes_a_failed_row_and_the_rest_still_runs,
    test_raising_child_is_a_failed_row_with_its_error,
    test_sigterm_leaves_the_json_and_no_child_behind,
)
