# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the demo on the bundled digits data
#   make test   create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --constraint constraints.txt
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench docs clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --editable ".[test,docs,models,lightning,transformers,tensorboard]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flatlens demo --out demo_out --overwrite

test: $(STAMP)
	FLATLENS_NO_SKIPS=1 $(BIN)/python -m pytest -n auto --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check flatlens tests benchmarks examples
	$(BIN)/ruff format --check flatlens tests benchmarks examples

format: $(STAMP)
	$(BIN)/ruff format flatlens tests benchmarks examples
	$(BIN)/ruff check --fix flatlens tests benchmarks examples

$(VENV)/.bench: $(STAMP)
	$(PIP) --editable ".[benchmark]"
	touch $(VENV)/.bench

bench: $(VENV)/.bench
	for b in spectrum flatness landscape optim distributed; do \
	  test ! -f benchmarks/bench_$$b.py || $(BIN)/python benchmarks/bench_$$b.py || exit 1; \
	done

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) demo_out .pytest_cache
