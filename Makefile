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
# lmms-eval (optional integration), tested at this exact version. Installed with --no-deps: its hard torchvision
# dependency resolves only to CUDA builds here and would replace the CPU torch; its core never imports torchvision.
# The list is what lmms-eval's evaluator and command line import on mmprune's path; filelock 4 removed a module
# lmms-eval 0.7.3 imports (every evaluation fails with "No module named 'filelock._api'").
LMMS_EVAL ?= lmms-eval==0.7.3
LMMS_EVAL_DEPS ?= "filelock<4" datasets accelerate loguru pyyaml sacrebleu evaluate pytz tenacity pytablewriter
TRANSFORMERS_OLDEST := $(shell sed -n 's/^OLDEST_TESTED = "\(.*\)"/\1/p' mmprune/upstream.py)

.PHONY: demo test test-oldest lmms-eval test-lmms-eval clean

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

lmms-eval: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL)"
	$(BIN)/python -m pip install -q $(LMMS_EVAL_DEPS)

test-lmms-eval: lmms-eval
	$(BIN)/python -m pytest tests/test_lmms_eval.py

test-oldest:
	$(MAKE) test VENV=$(OLDEST_VENV) PINS="transformers==$(TRANSFORMERS_OLDEST)"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) demo_out
