# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the demo on the bundled digits data
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --constraint constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) --editable ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flatlens demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check flatlens tests benchmarks examples
	$(BIN)/ruff format --check flatlens tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format flatlens tests benchmarks examples
	$(BIN)/ruff check --fix flatlens tests benchmarks examples

$(VENV)/.bench: $(STAMP)
	$(PIP) ".[benchmark]" --no-deps PyHessian==0.1 loss-landscapes==3.0.6
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	$(BIN)/python benchmarks/bench_spectrum.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
