# The two commands of the README. Both set up everything on a fresh Linux machine:
# a local virtualenv, torch (CUDA 13.0 build), a pip-installed nvcc of the same CUDA version,
# and deepkernels built from source with its CUDA extension (no GPU needed to build).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1
CUDA_TOOLKIT_WHEELS := "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
PY_DEPS := numpy safetensors ninja pybind11 setuptools wheel pytest pytest-benchmark "transformers>=5,<6" matplotlib
SOURCES := $(shell find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp') setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: demo test install clean memcheck racecheck

demo: build/.installed
	$(PY) -m deepkernels.demo

test: build/.installed
	DEEPKERNELS_REQUIRE_CUDA=$${DEEPKERNELS_REQUIRE_CUDA-1} $(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

install: build/.installed

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(CUDA_TOOLKIT_WHEELS) $(PY_DEPS)
	touch $@

# The CUDA build is required here (DEEPKERNELS_REQUIRE_CUDA=1): a compile error or warning fails it.
# build/build.log keeps nvcc's output; build/ptxas.txt the per-kernel registers/spills report.
build/.installed: $(VENV)/.deps $(SOURCES)
	mkdir -p build
	set -o pipefail; DEEPKERNELS_REQUIRE_CUDA=$${DEEPKERNELS_REQUIRE_CUDA-1} MAX_JOBS=$${MAX_JOBS-2} \
	  $(PIP) install --no-build-isolation --no-deps -v -e . > build/build.log 2>&1 \
	  || { grep -E -B2 -A8 'error|Error' build/build.log | tail -80; exit 1; }
	$(PY) tools/ptxas_report.py build/build.log build/ptxas.txt && cat build/ptxas.txt
	touch $@

# The emulated kernel tests again under a sanitizer, with a build of the emulator in build/<sanitizer>
# (the installed one is untouched). memcheck: AddressSanitizer, an out-of-bounds global or shared access
# aborts with its report. racecheck: ThreadSanitizer over the CUDA threads (fibers), a shared/global memory
# access pair with no barrier, collective or mbarrier between them is reported with both sites.
SANITIZED_EMU = DEEPKERNELS_ONLY_EMULATOR=1 DEEPKERNELS_EMULATOR_SANITIZE=$(1) MAX_JOBS=$${MAX_JOBS-2} \
	$(PY) setup.py -q build_ext --build-lib build/$(1) --build-temp build/$(1)-tmp > build/$(1).log 2>&1 \
	|| { tail -40 build/$(1).log; exit 1; }
memcheck: build/.installed
	$(call SANITIZED_EMU,address)
	LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 \
	  DEEPKERNELS_EMULATOR_LIB=$$(ls build/address/deepkernels/_emu*.so) $(PY) -m pytest -q -m emu $(PYTEST_ARGS) tests

racecheck: build/.installed
	$(call SANITIZED_EMU,thread)
	LD_PRELOAD="$$(g++ -print-file-name=libtsan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0 suppressions=$(CURDIR)/tools/tsan.supp" \
	  DEEPKERNELS_EMULATE_THREADS=1 DEEPKERNELS_EMULATOR_LIB=$$(ls build/thread/deepkernels/_emu*.so) \
	  $(PY) -m pytest -q -m emu $(PYTEST_ARGS) tests

clean:
	rm -rf build $(VENV) deepkernels/_C*.so deepkernels/_build_info.py *.egg-info
