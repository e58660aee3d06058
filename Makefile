PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pageload demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/pageload bench

lint: setup
	$(PY) -m pip install -q ruff mypy
	$(VENV)/bin/ruff check loader aio protocol workloads bench cli tests examples
	$(VENV)/bin/mypy loader aio protocol workloads bench cli

clean:
	rm -rf $(VENV) .demo .bench
