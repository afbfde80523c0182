# Two commands for a fresh machine: `make demo` and `make test` (both set up first if needed).
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast data repro docs clean-venv

setup: $(STAMP)

# Order matters: the local CPU torch first (so nothing pulls a CUDA build), then mmcv built with
# its compiled ops (needs setuptools<70 for pkg_resources, and no build isolation so it sees torch).
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools<70" wheel ninja numpy==2.4.6 mmengine==0.10.7 opencv-python==5.0.0.93
	$(PY) -c "import mmcv.ops" 2>/dev/null || MMCV_WITH_OPS=1 MAX_JOBS=2 $(PIP) install --no-build-isolation mmcv==2.1.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import cac, mmcv.ops, mmseg, mlflow, optuna" && touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The development loop: everything but the tests marked slow (those that train or run a model end to end).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

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
