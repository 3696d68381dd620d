"""Every Python block of README.md and docs/*.md runs as written.

The blocks of one file run top to bottom in one namespace, as a reader goes through the page (a later block may use
what an earlier one defined), in a fresh Python process whose working directory is a temporary folder (the blocks
write run folders and caches). Blocks that are not meant to run use another fence (```text, ```bash, ```yaml).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, source) of each ```python block of ``page``."""
    text = (ROOT / page).read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_python_blocks_run_as_written(page, tmp_path):
    blocks = python_blocks(page)
    # each block compiled with its page's line numbers, so a failure points at the page
    padded = ["\n" * (line - 1) + src for line, src in blocks]
    script = "\n".join(["namespace = {'__name__': '__main__'}"]
                       + [f"exec(compile({src!r}, {page!r}, 'exec'), namespace)" for src in padded])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, f"{page}: a python block failed\n{out.stderr[-4000:]}"


def test_every_page_is_checked():
    """A page added under docs/ is picked up; the README has blocks to run."""
    assert python_blocks("README.md")
    assert {"docs/training.md", "docs/noisy_teacher.md"} <= set(PAGES)
