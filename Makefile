# The two quick-start commands: `make bench` (the main job) and `make test`.
# Both set up .venv on first use, so they work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: bench test

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.step_time $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests $(ARGS)

$(VENV)/.installed: setup.py requirements-dev.txt $(wildcard csrc/*.h csrc/*.cuh csrc/*.cu csrc/*.cpp csrc/cpu/*.cpp csrc/step_cache/*.cpp)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-build-isolation -e .
	touch $@
