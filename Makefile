# fastdistill: `make test` and `make demo` work on a fresh CPU machine (they create .venv and install into it).
PYTHON_SYSTEM ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
# Added to the test install on a CPU torch only: the Triton whose 3.6 interpreter runs the Triton kernels' tests on the
# CPU, and the numpy it works with (< 2.4). A CUDA torch depends on the Triton it was built with, which these pins
# would replace or conflict with; no environment marker in pyproject.toml can tell the two torches apart.
CPU_TEST_PINS ?= triton==3.6.0 numpy<2.4
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install build test test-full lint bench bench-gpu kernels-report aot-all clean demo compat-2.11

# Each step leaves a stamp in the venv and runs again only when its inputs change:
#   .torch      the venv, the pinned CPU torch (first, so no requirement can pull a CUDA build; an importable torch
#               is kept) and the build tools
#   .deps-demo  the package's dependencies and the [demo] extra (what `make demo` needs)
#   .deps-test  the same with the [test] extra (and CPU_TEST_PINS on a CPU torch)
#               (both: FASTDISTILL_SKIP_EXT=1, an editable install that compiles nothing)
#   .built      the extension, compiled once, against that torch (--no-build-isolation; -v shows the compiler's
#               progress), and again when a C++/CUDA source, setup.py or pyproject.toml changes
$(VENV)/.torch:
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install --upgrade "setuptools>=77" ninja
	touch $@

$(VENV)/.deps-demo: $(VENV)/.torch pyproject.toml
	FASTDISTILL_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation -e ".[demo]"
	touch $@

$(VENV)/.deps-test: $(VENV)/.torch pyproject.toml
	pins=$$($(PY) -c "import torch; print('' if torch.version.cuda else '$(CPU_TEST_PINS)')"); \
	FASTDISTILL_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation -e ".[test]" $$pins
	touch $@

$(VENV)/.built: $(VENV)/.torch setup.py pyproject.toml $(CSRC)
	$(PY) -m pip install --no-build-isolation --no-deps -v -e .
	touch $@

install: $(VENV)/.deps-test $(VENV)/.built
build: install

test: $(VENV)/.deps-test $(VENV)/.built
	$(PY) -c "import fastdistill; assert fastdistill.extension_available(), 'fastdistill._C did not build'"
	$(PY) -m pytest -q tests --durations=25

# The same with the whole matrices where `make test` runs a covering part on the slow paths (tests/conftest.py FULL):
# every Triton configuration compiled for sm_90 and sm_80, every kd_loss matrix case in Triton's interpreter.
test-full: $(VENV)/.deps-test $(VENV)/.built
	FASTDISTILL_TEST_FULL=1 $(PY) -m pytest -q tests --durations=25

# torch 2.11, the GPU runs' release (CI tests 2.13): a second venv (PyPI's torch 2.11 is a CUDA build, ~4 GB, that
# runs on the CPU), _C built against it in a copy of the checkout (a build here would replace the 2.13 _C), and the
# tests outside Triton's interpreter, the packaging and the examples (~40 min on 2 cores; not part of `make test`).
# It found a Dynamo difference (2026-12-02) that 2.13 hides.
VENV_211 ?= $(CURDIR)/.venv-2.11
COMPAT_DIR ?= /tmp/fastdistill-torch-2.11
compat-2.11:
	test -x $(VENV_211)/bin/python || $(PYTHON_SYSTEM) -m venv $(VENV_211)
	pins='$(CPU_TEST_PINS)'; $(VENV_211)/bin/python -m pip install -q torch==2.11.0 $$pins "setuptools>=77,<82" ninja
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR) && git ls-files -co --exclude-standard | grep -v '^\.venv' \
		| tar -cf - -T - | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && pins='$(CPU_TEST_PINS)' && FASTDISTILL_SKIP_EXT=1 $(VENV_211)/bin/python -m pip install -q \
		--no-build-isolation -e ".[test]" $$pins && $(VENV_211)/bin/python -m pip install -q --no-build-isolation \
		--no-deps -e . \
		&& $(VENV_211)/bin/python -m pytest -q -p no:cacheprovider -k "not triton" \
		$$(ls tests/test_*.py | grep -v -e gpu -e aot -e packaging -e example -e cuda_build)

# The embedded demo (fastdistill demo): K = 4 teachers and 7 student variants on scikit-learn's bundled digits, 5
# seeds, 37 s on 2 cores; the table on stdout, learning curves in demo_out/learning_curves.png. Installs only the
# [demo] extra: a clean clone takes 2 min 14 s on 2 cores once torch is installed (README, measured).
# torch's CPU kernels held to AVX2 (fastdistill.apps.demo.REPRODUCIBLE_ENV), so the table is the documented one on
# AVX-512 machines too.
demo: $(VENV)/.deps-demo $(VENV)/.built
	env $$($(PY) -c "from fastdistill.apps.demo import REPRODUCIBLE_ENV as e; print(*(k + '=' + v for k, v in e.items()))") \
		$(PY) -m fastdistill demo --out demo_out

lint: $(VENV)/.deps-test
	$(VENV)/bin/ruff check .

bench: build
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.run_mi
	$(PY) -m benchmarks.run_codistill
	$(PY) -m benchmarks.run_fused_linear
	$(PY) -m benchmarks.run_host

# One GPU run in under 10 minutes (slots of 575 s), on a machine with torch, triton, pytest, transformers and liger-kernel preinstalled
# and no network: `make bench-gpu GPU_OUT=/some/dir` (default $OUT, else gpu-run-<date>). Stages, each with a time slot:
#   install    pip install -e . offline (--no-index); on failure the source tree is used (PYTHONPATH). It builds the
#              C++ CPU kernels and the CUDA kernels (csrc/cuda: 11 translation units, compiled in parallel, for
#              sm_80 and sm_90a); without a working install the cuda rows and tests report "no CUDA kernel"
#   tests      the GPU test files, one pytest per file at once (they took > 3 min one after another on the H200),
#              stopped by SIGINT at the end of the slot (pytest still prints its summary); test_cuda_kd_gpu.py names
#              the shape class and residency of each check; a test still running after 40 s has every thread's
#              stack dumped to its log (faulthandler_timeout): a test hung in a CUDA sync ignores the SIGINT and
#              is killed without a summary, and the dump names it
#   sanitize   tests/cuda_sanitize.py (a small run of every CUDA residency) under compute-sanitizer memcheck,
#              racecheck and synccheck (barriers some threads miss, shuffle masks) at once, only kd_row_kernel checked
#   kd divergences mi codistill fused   benchmarks.run (KL; then the other divergences, Triton and CUDA, at V = 128256,
#              K = 4) / run_mi / run_codistill at the shapes of benchmarks/results/h200-2026-11-28,
#              and run_fused_linear (N = 16384, H = 4096, V = 128256, K = 1, 2: fused vs unfused vs Liger;
#              the weight gradient accumulated in float32 and, at K = 1, in bfloat16), each
#              provider's shapes in one child process (benchmarks/isolate.py), a fresh one after any failure: a
#              crash, CUDA error or hang is a failed row, a row that cannot start in time is "skipped: budget", the
#              JSON is saved after every row. Providers run in order of importance (all shapes of each), so a short
#              slot drops the last ones
# Slots count from the start and what a stage leaves unused goes to the next, so the run ends by the slots' sum (575
# s) plus a few seconds; a benchmark script that overruns is killed at GPU_HARD_S (590 s) at the latest. A child costs ~3-5 s of start-up (import torch, CUDA) once per provider, not per row (since
# 2026-12-03), plus ~10 s of compilation per shape for torch.compile: kd has 40 rows in 10 providers' children
# (triton-chunks times 4 chunk sizes in one cell), divergences 15 in 3, mi 15 in 5, codistill 8 in 4 and the
# agreement check, fused 6 in 4 (each ~1 s of matmuls). benchmarks.* --child-per-cell restores a child per row.
# No stage stops the others. Output: $(GPU_OUT)/{kd,divergences,mi,codistill,fused}-cuda.json and one log,
# $(GPU_OUT)/bench-gpu.log. GPU_STAGES="kd mi" runs some stages; GPU_DEVICE=cpu with small shapes
# (GPU_KD_SHAPES="--rows 64 --vocab 128 ...") rehearses it all on a CPU, as make test does (tests/test_make_bench.py:
# the stages' arguments against their scripts and the gates, a tiny run of every stage but install and sanitize, the
# hard end).
# python3: the interpreter that holds torch on the GPU image (a plain "python" may not be on its PATH)
GPU_PY ?= python3
# $OUT, where the machine's runner collects what comes back, else gpu-run-<date>
ifndef GPU_OUT
GPU_OUT := $(if $(OUT),$(OUT),gpu-run-$(shell date +%F))
endif
GPU_STAGES ?= install tests sanitize kd divergences mi codistill fused
GPU_DEVICE ?= cuda
GPU_INSTALL_S ?= 110
GPU_TESTS_S ?= 85
GPU_SANITIZE_S ?= 50
GPU_KD_S ?= 115
GPU_DIVERGENCES_S ?= 55
GPU_MI_S ?= 70
GPU_CODISTILL_S ?= 35
GPU_FUSED_S ?= 55
# the most one benchmark row (child process: start-up, compilation, timing) may take
GPU_CHILD_S ?= 45
# no stage runs past it (from the start; the runner stops everything at 600 s): a benchmark script that overruns its
# slot is killed at the latest here (SIGTERM, SIGKILL 5 s later), its rows measured until then already saved
GPU_HARD_S ?= 590
GPU_KD_SHAPES ?= --dtype bfloat16 --rows 8192 --vocab 32768,128256 --teachers 1,4 \
	--providers triton,cuda,compile,triton-v2,triton-chunks,cuda-v1,liger,cuda-v2,eager,cuda-global --repeats 20
# every other divergence, Triton (v3, then v2: C = 1) and CUDA, at the largest kd shape (issue 17 reports them all at
# V = 128256, K = 4)
GPU_DIVERGENCES_SHAPES ?= --dtype bfloat16 --rows 8192 --vocab 128256 --teachers 4 --providers triton,triton-v2,cuda \
	--divergences reverse_kl,jsd,tvd,skew_kl,skew_reverse_kl --repeats 10
GPU_MI_SHAPES ?= --dtype bfloat16 --shapes 16384x768,16384x128,65536x768 \
	--providers triton,loss-triton,triton-tiles,compile,loss-compile --repeats 5
GPU_CODISTILL_SHAPES ?= --dtype bfloat16 --rows 8192 --vocab 32768,128256 --temperatures 2 \
	--providers fused-triton,compile,two-kd-triton,eager --repeats 10
GPU_FUSED_SHAPES ?= --dtype bfloat16 --rows 16384 --hidden 4096 --vocab 128256 --teachers 1,2 \
	--providers fused-triton,unfused-triton,liger,fused-triton-acc16 --repeats 3
GPU_LOG = $(GPU_OUT)/bench-gpu.log
GPU_ENV = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}
gpu_slot = $(if $(filter $(1),$(GPU_STAGES)),$(2),0)
gpu_now = $$(( $$(date +%s) - $(GPU_T0) ))
# $(call gpu_left,END): seconds from now to END, at least 1 (timeout reads 0 as "no limit")
gpu_left = $$(( ($(1) - $$(date +%s)) > 1 ? ($(1) - $$(date +%s)) : 1 ))
# $(call gpu_stage,NAME,COMMAND): COMMAND if NAME is in GPU_STAGES, its output and exit status appended to the log
# (tests and sanitize: 1 if any of their processes' own exit status, printed with its log, is not 0)
gpu_stage = { echo "=== $(1) at +$(gpu_now) s"; $(if $(filter $(1),$(GPU_STAGES)),$(2); echo "=== $(1): exit \
	status $$? at +$(gpu_now) s",echo "(not in GPU_STAGES)"); } 2>&1 | tee -a $(GPU_LOG)
# $(call gpu_bench,MODULE,END,ARGS,NAME): a benchmark script that stops by END (Unix time), killed 30 s after it or
# at the run's hard end, whichever comes first
gpu_bench = $(GPU_ENV) timeout -k 5 $(call gpu_left,(($(2) + 30) < $(GPU_HARD_END) ? ($(2) + 30) : $(GPU_HARD_END))) \
	$(GPU_PY) -m benchmarks.$(1) --device \
	$(GPU_DEVICE) $(3) --deadline $(2) --child-timeout-s $(GPU_CHILD_S) --out $(GPU_OUT)/$(4)-$(GPU_DEVICE).json
# The build's tools are printed first: pip's build needs setuptools >= 77 (pyproject.toml's license fields), and
# without ninja setup.py runs one compiler per source in forked children. If pip fails, _C is built in place from a
# copy of setup.py, csrc/ and cuda_build.py without pyproject.toml (an older setuptools rejects its metadata, not the
# build), and the .so is copied next to the sources that the stages import.
GPU_INSTALL_CMD = $(GPU_PY) -c "import setuptools, shutil; print('setuptools', setuptools.__version__, '| ninja', \
	shutil.which('ninja'))"; timeout -k 5 $(call gpu_left,$(GPU_END_INSTALL)) $(GPU_PY) -m pip install \
	--no-build-isolation --no-deps --no-index --disable-pip-version-check -e .; rc=$$?; [ $$rc -eq 0 ] || { \
	echo "pip install failed (exit status $$rc): building _C in place"; d=$$(mktemp -d); mkdir -p $$d/fastdistill/ops \
	&& cp -r setup.py csrc $$d/ && cp fastdistill/ops/cuda_build.py $$d/fastdistill/ops/ && (cd $$d && timeout -k 5 \
	$(call gpu_left,$(GPU_END_INSTALL)) $(GPU_PY) setup.py -q build_ext --inplace) && cp $$d/fastdistill/_C*.so \
	$$d/fastdistill/_build_info.py fastdistill/; rc=$$?; rm -rf $$d; [ $$rc -eq 0 ] || echo "no _C: the stages \
	below import the source tree (PYTHONPATH=$(CURDIR))"; }; (exit $$rc)
GPU_TESTS_CMD = logs=$$(mktemp -d); for f in tests/test_*gpu*.py; do ( $(GPU_ENV) TORCHINDUCTOR_COMPILE_THREADS=1 \
	OMP_NUM_THREADS=2 timeout -s INT -k 10 \
	$(call gpu_left,$(GPU_END_TESTS)) $(GPU_PY) -m pytest -o addopts= -o faulthandler_timeout=40 -q -rfE \
	-p no:cacheprovider --durations=10 $$f; echo "exit status $$?" ) > $$logs/$$(basename $$f).log 2>&1 & done; wait; \
	st=0; for f in $$logs/*.log; do echo "--- $$(basename $$f .log)"; cat $$f; tail -n 1 $$f | grep -qx "exit status 0" \
	|| st=1; done; rm -rf $$logs; (exit $$st)
# compute-sanitizer on a small run of the CUDA kernel, memcheck, racecheck and synccheck side by side, only
# kd_row_kernel checked; without PyTorch's caching allocator, so that an access past a small tensor's end is outside
# any allocation (inside a cached 2 MB block memcheck would not see it); a long log keeps its first errors too
GPU_SANITIZE_CMD = san=$$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer); \
	logs=$$(mktemp -d); for tool in memcheck racecheck synccheck; do ( $(GPU_ENV) PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
	timeout -k 5 $(call gpu_left,$(GPU_END_SANITIZE)) $$san --tool $$tool --error-exitcode 9 --kernel-name kns=kd_row_kernel \
	$(GPU_PY) tests/cuda_sanitize.py; echo "exit status $$?" ) > $$logs/$$tool.log 2>&1 & done; wait; \
	st=0; for f in $$logs/*.log; do echo "--- $$(basename $$f .log)"; if [ $$(wc -l < $$f) -gt 80 ]; then \
	head -n 40 $$f; echo "[...]"; tail -n 40 $$f; else cat $$f; fi; tail -n 1 $$f | grep -qx "exit status 0" || st=1; \
	done; rm -rf $$logs; (exit $$st)
bench-gpu:
	$(eval GPU_T0 := $(shell date +%s))
	$(eval GPU_END_INSTALL := $(shell expr $(GPU_T0) + $(call gpu_slot,install,$(GPU_INSTALL_S))))
	$(eval GPU_END_TESTS := $(shell expr $(GPU_END_INSTALL) + $(call gpu_slot,tests,$(GPU_TESTS_S))))
	$(eval GPU_END_SANITIZE := $(shell expr $(GPU_END_TESTS) + $(call gpu_slot,sanitize,$(GPU_SANITIZE_S))))
	$(eval GPU_END_KD := $(shell expr $(GPU_END_SANITIZE) + $(call gpu_slot,kd,$(GPU_KD_S))))
	$(eval GPU_END_DIVERGENCES := $(shell expr $(GPU_END_KD) + $(call gpu_slot,divergences,$(GPU_DIVERGENCES_S))))
	$(eval GPU_END_MI := $(shell expr $(GPU_END_DIVERGENCES) + $(call gpu_slot,mi,$(GPU_MI_S))))
	$(eval GPU_END_CODISTILL := $(shell expr $(GPU_END_MI) + $(call gpu_slot,codistill,$(GPU_CODISTILL_S))))
	$(eval GPU_END_FUSED := $(shell expr $(GPU_END_CODISTILL) + $(call gpu_slot,fused,$(GPU_FUSED_S))))
	$(eval GPU_HARD_END := $(shell expr $(GPU_T0) + $(GPU_HARD_S)))
	mkdir -p $(GPU_OUT)
	-{ echo "=== make bench-gpu $$(date -Is): stages $(GPU_STAGES), to end by +$$(( $(GPU_END_FUSED) \
		- $(GPU_T0) )) s"; nvidia-smi -L; } 2>&1 | tee -a $(GPU_LOG)
	-$(call gpu_stage,install,$(GPU_INSTALL_CMD))
	-$(call gpu_stage,tests,$(GPU_TESTS_CMD))
	-$(call gpu_stage,sanitize,$(GPU_SANITIZE_CMD))
	-$(call gpu_stage,kd,$(call gpu_bench,run,$(GPU_END_KD),$(GPU_KD_SHAPES),kd))
	-$(call gpu_stage,divergences,$(call gpu_bench,run,$(GPU_END_DIVERGENCES),$(GPU_DIVERGENCES_SHAPES),divergences))
	-$(call gpu_stage,mi,$(call gpu_bench,run_mi,$(GPU_END_MI),$(GPU_MI_SHAPES),mi))
	-$(call gpu_stage,codistill,$(call gpu_bench,run_codistill,$(GPU_END_CODISTILL),$(GPU_CODISTILL_SHAPES),codistill))
	-$(call gpu_stage,fused,$(call gpu_bench,run_fused_linear,$(GPU_END_FUSED),$(GPU_FUSED_SHAPES),fused))
	-echo "=== done at +$(gpu_now) s; results in $(GPU_OUT)" | tee -a $(GPU_LOG)

# What a GPU would compile, read on this machine (no GPU): the Triton kernel configurations the launchers pick at the
# GPU benchmark shapes, compiled for sm_90 with the triton wheel's ptxas; registers, spills, shared memory and the
# occupancy they allow, from the cubins (fastdistill/ops/triton/aot.py; make test compiles a subset holding every pair
# of switch values; make aot-all compiles every configuration, ~35 minutes on 2 cores with Triton's cache cold, as
# make test-full does).
kernels-report: install
	$(PY) -m fastdistill.ops.triton.aot --report bench --arch 90
	$(PY) -m fastdistill.ops.cuda_build

aot-all: install
	$(PY) -m fastdistill.ops.triton.aot

clean:
	rm -rf build *.egg-info fastdistill/_C*.so fastdistill/_build_info.py $(VENV)/.built
