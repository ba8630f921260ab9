# Set-up and the main jobs. `make repro` and `make test` bootstrap everything they need on a fresh
# machine; a second run installs nothing (the stamp file is newer than the requirement files).
SHELL   := /bin/bash
PYTHON  ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export DVC_STUDIO_OFFLINE := 1
export ITERATIVE_DO_NOT_TRACK := 1
export PYTHONHASHSEED := 0
# The Agg backend would drop every figure from the notebooks and reports.
unexport MPLBACKEND

.PHONY: setup repro paper exp test lab bench lint clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: left to the resolver it would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

repro: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show --precision 3 >/dev/null
	@echo "reports: reports/index.html"

# One paper through DVC: make paper SLUG=smote
paper: $(STAMP)
	@test -n "$(SLUG)" || { echo "usage: make paper SLUG=<slug> (see params.yaml: papers)"; exit 2; }
	$(BIN)/dvc repro paper@$(SLUG)

# A parameter variant as a DVC experiment in a temporary copy, leaving the workspace as it is:
# make exp SET='papers.smote.n_seeds=10'
exp: $(STAMP)
	@test -n "$(SET)" || { echo "usage: make exp SET='papers.<slug>.<key>=<value>'"; exit 2; }
	$(BIN)/dvc exp run --temp -S '$(SET)'
	$(BIN)/dvc exp show --md --only-changed --drop '.*(versions|peak_|runtime_s|wall_s|metrics\.|Created).*'

test: $(STAMP)
	$(BIN)/pytest

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

bench: $(STAMP)
	PYTHONPATH=lib $(BIN)/python -m repsuite.bench

lint: $(STAMP)
	$(BIN)/ruff check lib tests notebooks

clean-venv:
	rm -rf $(VENV)
