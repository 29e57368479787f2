# Two commands: `make demo` and `make test`. Both create .venv on first use and
# install the pinned stack (constraints.txt) with the project in editable mode.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench lint dist docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.train --algo mappo --env smax:3m --total-steps 1e6 --num-seeds 1

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow

bench: $(STAMP)
	$(BIN)/python -m experiments.bench

dist: $(STAMP)
	$(BIN)/python -m build --no-isolation --outdir dist .

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff format --check marl envs algos experiments tests
	$(BIN)/ruff check marl envs algos experiments tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache dist site
