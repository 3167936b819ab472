# Two entry points for a fresh machine: `make demo` and `make test`.
# CONSTRAINTS pins torch to the CPU wheel; on a GPU machine run `make CONSTRAINTS= test`.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PIP_C = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(PIP_C) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/python -m pytest -q

demo: install
	$(VENV)/bin/iterft demo

.PHONY: install test demo
