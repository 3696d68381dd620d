"""`make bench-gpu`, the one command a GPU run executes, checked here where a mistake would otherwise cost that run:
each benchmark stage's arguments (the Makefile's GPU_*_SHAPES, read from make itself) parse and name providers its
script knows, and the rows they ask for are every row the issues' gates read; the command rehearsed on the CPU at tiny
shapes writes every stage's JSON with every row measured; and a stage that overruns is killed at the run's hard end
(GPU_HARD_S), inside the runner's 600 s, with the rows measured so far saved."""

import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's benchmarks/ package

from benchmarks import gates  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# stage -> (its script under benchmarks/, the Makefile variable holding its arguments)
STAGES = {
    "kd": ("run", "GPU_KD_SHAPES"),
    "divergences": ("run", "GPU_DIVERGENCES_SHAPES"),
    "mi": ("run_mi", "GPU_MI_SHAPES"),
    "codistill": ("run_codistill", "GPU_CODISTILL_SHAPES"),
    "fused": ("run_fused_linear", "GPU_FUSED_SHAPES"),
}


# (this file's name has no "gpu" in it: bench-gpu's tests stage runs tests/test_*gpu*.py)
# make as from a shell: not an enclosing make's flags and command-line variables (`make test` runs these tests; make
# exports a command-line variable by name too), nor bench-gpu's settings exported in the shell
ENV = {k: v for k, v in os.environ.items()
       if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "OUT") and not k.startswith("GPU_")}


def make_variable(name: str) -> str:
    """The value make gives the Makefile's variable ``name`` (its defaults, continuation lines joined)."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "print-%: ; @echo $($*)", f"print-{name}"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def stage_args(stage: str):
    """The stage's script module and its parsed arguments, with what the Makefile's gpu_bench adds."""
    module_name, variable = STAGES[stage]
    module = importlib.import_module(f"benchmarks.{module_name}")
    argv = shlex.split(make_variable(variable)) + ["--device", "cuda", "--deadline", "0", "--child-timeout-s", "45",
                                                   "--out", "unused.json"]  # fmt: skip
    return module, module.parse_args(argv)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_arguments_parse_and_name_known_providers(stage):
    module, args = stage_args(stage)
    providers = [p for p in args.providers.split(",") if p]
    assert providers, f"{stage}: no providers"
    assert [p for p in providers if p not in module.PROVIDERS] == [], f"{stage}: unknown providers"
    assert len(set(providers)) == len(providers), f"{stage}: a provider twice"
    assert args.dtype == "bfloat16"  # the issues' gates are bf16 throughout
    if stage in ("kd", "divergences"):
        from fastdistill.ops import divergences

        divs = [d for d in args.divergences.split(",") if d]
        assert [d for d in divs if d not in divergences.NAMES] == [], f"{stage}: unknown divergences"
        if stage == "divergences":  # (kd's five-line baselines are forward KL only)
            assert [p for p in providers if p not in module.DIVERGENCE_PROVIDERS] == []


def _requested_rows() -> dict[str, list[dict]]:
    """The rows the Makefile's stages ask for, as their scripts key them (benchmarks/run*.py's isolate.Cell keys),
    each as if measured; less the cells a script refuses on any GPU (Liger's and the bf16-accumulation variant's
    K != 1, other divergences on the five-line baselines)."""
    rows: dict[str, list[dict]] = {}
    measured = {"status": "ok", "ms": 1.0, "floor_fraction": 1.0, "fraction_of_peak": 1.0, "peak_bytes": 1}
    for stage in STAGES:
        module, a = stage_args(stage)
        providers = [p for p in a.providers.split(",") if p]
        keys: list[dict] = []
        if stage in ("kd", "divergences"):
            divs = [d for d in a.divergences.split(",") if d]
            for p, v, k, d in itertools.product(providers, a.vocab, a.teachers, divs):
                if not ((p == "liger" and k != 1) or (d != "kl" and p not in module.DIVERGENCE_PROVIDERS)):
                    keys.append({"provider": p, "V": v, "K": k, "N": a.rows} | ({"divergence": d} if d != "kl" else {}))
        elif stage == "mi":
            keys = [{"provider": p, "N": n, "D": d} for p in providers for n, d in a.shapes]
        elif stage == "codistill":
            keys = [{"provider": p, "V": v, "T": t, "N": a.rows}
                    for p in providers for v in a.vocab for t in a.temperatures]  # fmt: skip
        else:
            keys = [{"provider": p, "K": k, "N": a.rows, "H": a.hidden, "V": a.vocab}
                    for p in providers for k in a.teachers
                    if not (p in ("liger", "fused-triton-acc16") and k != 1)]  # fmt: skip
        rows[stage] = [key | {"dtype": a.dtype} | measured for key in keys]
    return rows


def test_the_stages_ask_for_every_row_the_gates_read():
    """A GPU run whose every row succeeds leaves no gate MISSING: a provider or shape dropped from a stage's
    arguments (or a gate added without its row) fails here, not after the run."""
    missing = [g.what for g, value, _ in gates.check(_requested_rows()) if value is None]
    assert missing == []


def _row_keys(rows: list[dict]) -> set[str]:
    return {k for r in rows for k in r}


def _run_bench_gpu(out: Path, stages: str, timeout: float, **variables: str) -> subprocess.CompletedProcess:
    cmd = ["make", "-s", "--no-print-directory", "bench-gpu", f"GPU_OUT={out}", f"GPU_STAGES={stages}",
           "GPU_DEVICE=cpu", f"GPU_PY={sys.executable}", *(f"{k}={v}" for k, v in variables.items())]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


TINY = {
    "GPU_KD_SHAPES": "--rows 16 --vocab 64 --teachers 1,2 --providers cpu,eager --repeats 1",
    "GPU_DIVERGENCES_SHAPES": "--rows 16 --vocab 64 --teachers 2 --providers cpu --divergences reverse_kl,jsd "
                              "--repeats 1",
    "GPU_MI_SHAPES": "--shapes 16x8 --providers cpu,loss-cpu --repeats 1",
    "GPU_CODISTILL_SHAPES": "--rows 16 --vocab 64 --temperatures 2 --providers fused-cpu,two-kd-cpu --repeats 1",
    "GPU_FUSED_SHAPES": "--rows 16 --hidden 8 --vocab 64 --teachers 1 --providers fused-cpu,unfused-cpu --repeats 1",
}  # fmt: skip


def test_bench_gpu_rehearsed_on_the_cpu(tmp_path):
    """The whole command but install and sanitize (the GPU test files skip here), every benchmark stage at tiny
    shapes on the cpu backend: each stage exits 0, each JSON holds every row measured, the log ends with "done"."""
    import fastdistill

    if not fastdistill.extension_available():
        pytest.skip("the cpu providers need fastdistill._C")
    # slots with room for a slow or busy machine (the GPU's are sized for its timings, not these)
    slots = {f"GPU_{stage.upper()}_S": "150" for stage in ("tests", *STAGES)} | {"GPU_HARD_S": "1200"}
    proc = _run_bench_gpu(tmp_path, "tests kd divergences mi codistill fused", 1200, **TINY, **slots)
    log = (tmp_path / "bench-gpu.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("tests", *STAGES):
        assert re.search(rf"^=== {stage}: exit status 0 at \+\d+ s$", log, re.M), f"{stage}:\n{log[-3000:]}"
    assert re.search(r"^=== done at \+\d+ s", log, re.M)
    expected = {"kd": 4, "divergences": 2, "mi": 2, "codistill": 2, "fused": 2}
    for stage, n in expected.items():
        rows = json.loads((tmp_path / f"{stage}-cpu.json").read_text())["rows"]
        assert [r["status"] for r in rows] == ["ok"] * n, (stage, rows)
    # the row keys test_the_stages_ask_for_every_row_the_gates_read builds are the scripts' own
    rows = {s: json.loads((tmp_path / f"{s}-cpu.json").read_text())["rows"] for s in expected}
    assert {"provider", "V", "K", "N", "ms", "floor_fraction", "peak_bytes"} <= _row_keys(rows["kd"])
    assert {"divergence"} <= _row_keys(rows["divergences"])
    assert {"provider", "N", "D", "ms", "fraction_of_peak", "peak_bytes"} <= _row_keys(rows["mi"])
    assert {"provider", "V", "T", "N", "ms", "floor_fraction", "peak_bytes"} <= _row_keys(rows["codistill"])
    assert {"provider", "K", "N", "H", "V", "ms", "peak_bytes"} <= _row_keys(rows["fused"])


def test_a_stage_that_overruns_is_killed_at_the_hard_end(tmp_path):
    """The kd stage given a 300 s slot and rows that would take longer, the run's hard end at 25 s: the script is
    stopped there (timeout's SIGTERM: exit status 124), the run goes on to its end, and the JSON of what was measured
    is on disk (the script saves it on SIGTERM once it has started: ~6 s of imports and a bandwidth probe here, so
    the hard end leaves a slow machine room). Before the hard end the last stage's backstop was its slot's end + 35 s,
    past the runner's 600 s."""
    start = time.monotonic()
    proc = _run_bench_gpu(tmp_path, "kd", 150, GPU_KD_S="300", GPU_HARD_S="25", GPU_CHILD_S="200",
                          GPU_KD_SHAPES="--rows 512 --vocab 4096 --teachers 1 --providers reference --repeats 100000")
    took = time.monotonic() - start
    log = (tmp_path / "bench-gpu.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^=== kd: exit status 124 at \+\d+ s$", log, re.M), log[-3000:]
    assert re.search(r"^=== done at \+\d+ s", log, re.M)
    assert took < 90, took  # 25 s, SIGKILL 5 s later at the latest, and make's own start
    saved = json.loads((tmp_path / "kd-cpu.json").read_text())
    assert saved["rows"] and saved["rows"][0]["provider"] == "reference"
