# The two quick-start commands: `make bench` (the main job) and `make test`.
# Both set up .venv on first use, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: bench test

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.step_time $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests $(ARGS)

SOURCES := setup.py largedet_kernels/_extensions.py \
	$(wildcard csrc/*.h csrc/*.cuh csrc/*.cu csrc/*.cpp csrc/cpu/*.cpp csrc/step_cache/*.cpp)

# The main job's setup: what it runs, the CPU kernels of this machine's ISA, the CUDA kernels where a GPU is.
$(VENV)/.bench: requirements-bench.txt $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-bench.txt
	LARGEDET_CPU_ISAS=native LARGEDET_CUDA_BUILD=$$($(BIN)/python -c "import torch; print('auto' if torch.cuda.is_available() else 0)") \
		$(BIN)/pip install -q --no-build-isolation -e .
	touch $@

# The tests' setup: everything they use, every kernel built.
$(VENV)/.installed: requirements-dev.txt requirements-bench.txt $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@
