# Set-up and entry points. `make run` and `make test` each build the virtual environment first.
#
# TORCH_SPEC picks the PyTorch build. The default is the CPU build (this pin resolves to it on machines
# without CUDA wheels locally); on a GPU machine use e.g. `make run TORCH_SPEC=torch` after installing the
# CUDA build that matches your driver.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test lint clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/gptflow run

# Lint first (seconds), then every test, the slow-marked ones included.
test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check --no-cache . && $(VENV)/bin/ruff format --no-cache --check .

clean-venv:
	rm -rf $(VENV)
