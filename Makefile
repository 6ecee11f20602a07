# The README's two commands: `make demo` and `make test`. Each creates (or reuses) the virtualenv in .venv.
# torch is installed first, alone, so pip never resolves the CUDA build on a CPU machine: set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu where the default index would serve CUDA wheels.
# `make test` runs the suite on the newest transformers pyproject.toml allows; `make test-oldest` on the oldest
# (mmprune/upstream.py's OLDEST_TESTED), in .venv-oldest. CI runs both.
PYTHON ?= python3
VENV ?= .venv
OLDEST_VENV ?= .venv-oldest
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PINS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRANSFORMERS_OLDEST := $(shell sed -n 's/^OLDEST_TESTED = "\(.*\)"/\1/p' mmprune/upstream.py)

.PHONY: demo test test-oldest clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,plots]" $(PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mmprune.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-oldest:
	$(MAKE) test VENV=$(OLDEST_VENV) PINS="transformers==$(TRANSFORMERS_OLDEST)"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) demo_out
