# Everything a newcomer runs. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv demo up down status test test-all test-faults soak bench lint clean lock

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv and install requirements.txt

demo: $(STAMP)  ## run the retraining DAG end to end on a generated sample (offline; see README for timings)
	$(PY) scripts/devstack.py demo

up: $(STAMP)  ## start the demo object store and `airflow standalone` (UI: http://localhost:8080)
	$(PY) scripts/devstack.py up

down:  ## stop what `make up` started
	@test -x $(PY) && $(PY) scripts/devstack.py down || true

status:  ## show what the demo stack is running
	$(PY) scripts/devstack.py status

test: $(STAMP)  ## the test suite (what CI runs)
	$(PY) -m pytest -q -m "not faults and not slow" --timeout=900

test-all: $(STAMP)  ## every test, the slow ones too
	$(PY) -m pytest -q --timeout=1800

test-faults: $(STAMP)  ## fault-injection tests
	$(PY) -m pytest -q -m faults --timeout=1800

soak: $(STAMP)  ## trigger the DAG N times on airflow standalone with random faults, check invariants (N=10)
	$(PY) scripts/soak.py --runs $${N:-10}

bench: $(STAMP)  ## benchmarks (minutes; prints ratios against in-process baselines)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(PY) -m ruff check ml dags plugins tests scripts benchmarks

lock: $(STAMP)  ## regenerate constraints.txt from the installed venv
	$(PY) -m pip freeze --exclude-editable > constraints.txt

clean: down  ## remove everything the demo and tests wrote (keeps .venv)
	rm -rf .demo .work .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
