# The README's two commands: `make demo` and `make test`. Each creates (or reuses) the virtualenv in .venv.
# torch is installed first, alone, so pip never resolves the CUDA build on a CPU machine: set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu where the default index would serve CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,plots]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mmprune.demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) demo_out
