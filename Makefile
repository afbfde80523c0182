# Two commands for a fresh machine: `make demo` and `make test` (both set up first if needed).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast data repro docs clean-venv

setup: $(STAMP)

# Order matters: the local CPU torch first (so nothing pulls a CUDA build), then mmcv built with
# its compiled ops (its setup.py needs setuptools<70, and no build isolation so it sees torch). torch
# itself asks for setuptools>=77: the old one comes in for the build only, with --no-deps (mmcv's own
# dependencies came with mmengine) so pip reports no conflict it knows is temporary, and
# requirements.txt then pins the setuptools the stack runs with.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q wheel ninja numpy==2.4.6 mmengine==0.10.7 opencv-python==5.0.0.93
	$(PY) -c "import mmcv.ops" 2>/dev/null || ($(PIP) install -q --no-deps "setuptools<70" && \
	    MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install --no-deps --no-build-isolation mmcv==2.1.0)
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import cac, mmcv.ops, mmseg, mlflow, optuna" && touch $(STAMP)

# Two processes, each test file on one of them (its module fixtures, a Slurm cluster or a PostgreSQL
# server, are made once): many tests wait on servers, jobs and schedulers as often as they compute.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# The development loop: everything but the tests marked slow (those that train or run a model end to end).
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" $(PYTEST_ARGS)

data: setup
	$(VENV)/bin/cac-exp data context-scenes --preset quick --out data/context-scenes/quick
	$(VENV)/bin/cac-exp data context-scenes --preset bench --out data/context-scenes/bench

demo: setup
	$(VENV)/bin/cac-exp demo

# The guides (docs/) as a site in site/; --strict: a broken link, anchor or snippet fails the build.
docs: setup
	$(VENV)/bin/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)

# The DVC pipeline (data -> tables -> report) with the venv's tools on PATH.
repro: setup
	@echo "(real datasets: dvc repro realdata/dvc.yaml:ade20k, realdata/dvc.yaml:cocostuff)"
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro
