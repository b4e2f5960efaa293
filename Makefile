# LLMasOS: `make test` sets up .venv and runs every gate; `make demo` runs the main job.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: all venv install test ctest sanitize lint bench demo clean

all: test

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

venv: $(PY)

# Non-editable on purpose: the tests run against the package as a user gets it.
install: $(PY)
	$(PIP) install --quiet '.[test]'

ctest:
	$(MAKE) -C csrc test

sanitize:
	$(MAKE) -C csrc sanitize

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

test: install ctest sanitize lint
	$(PY) -m pytest

bench: $(PY)
	$(PIP) install --quiet '.[bench]'
	$(PY) benchmarks/alloc.py
	$(PY) benchmarks/ipc.py
	$(PY) benchmarks/kernel.py
	$(PY) benchmarks/scheduling.py

demo: install
	$(VENV)/bin/llmasos demo

clean:
	$(MAKE) -C csrc clean
	rm -rf build $(VENV) src/*.egg-info
