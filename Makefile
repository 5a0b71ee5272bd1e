# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv if it is missing and install the three packages (plain pip, torch pinned by constraints.txt).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# The pin must also reach pip's isolated build environments (DeepSpeed builds from source against torch).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# DeepSpeed compiles its CPU shared-memory comm op on first use. Keep the build inside this checkout's venv (a build
# for another venv is stale here and would be rebuilt, racing between ranks) and build it once during set-up.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

PYTEST_ARGS ?=
QUICK ?= 0
DEMO_ARGS ?=

.PHONY: setup test lint demo compare bench clean help

help:
	@echo "make demo      set up .venv, then run the main job offline on the embedded default (QUICK=1: smoke run)"
	@echo "make compare   train and evaluate each fusion variant under the same budget (demo-output/compare/)"
	@echo "make test      set up .venv, lint, then run the test suite (what CI runs)"
	@echo "make lint      ruff + mypy"
	@echo "make bench     benchmarks: prints measured ratios, writes bench/results/summary.json (QUICK=1: a few minutes)"

$(STAMP): constraints.txt pyproject.toml schemas/pyproject.toml packages/merra2_text_data/pyproject.toml packages/fusion_trainer/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=25.1"
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0"
	$(PIP) install --quiet -c constraints.txt \
		-e schemas -e packages/merra2_text_data -e "packages/fusion_trainer[lora]" --group dev
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	@touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py --quick $(QUICK) $(DEMO_ARGS)

compare: setup
	$(PY) scripts/demo.py --compare $(DEMO_ARGS)

bench: setup
	$(PY) bench/run_all.py $(if $(filter 1,$(QUICK)),--quick)

clean:
	rm -rf demo-output .pytest_cache .mypy_cache .ruff_cache
