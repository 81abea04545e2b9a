# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv on first use. TORCH pins the CPU wheel that dev machines carry on disk;
# on a GPU box use e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,tune]'
	touch $@

.PHONY: install demo test test-unit test-all lint bench
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/bigray demo

test: $(VENV)/.installed
	$(BIN)/pytest -q

test-unit: $(VENV)/.installed
	$(BIN)/pytest -q tests/unit

test-all: $(VENV)/.installed
	$(BIN)/pytest -q -m ''

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/prepare.py
