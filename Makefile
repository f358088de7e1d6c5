# Lepton: one entry point for every task. `make serve` and `make test` set up what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL := build/models/demo
ONNX_DEMO := build/onnx/demo
RUNNER ?= torch
ifeq ($(RUNNER),onnxruntime)
MODEL ?= $(ONNX_DEMO)
else
MODEL ?= $(DEMO_MODEL)
endif
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: help setup demo-model export bench-runners serve test test-unit clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup:  ## venv with pinned packages, libb64, Python backend stub, start check (idempotent)
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh

$(DEMO_MODEL)/config.json: export/demo_model.py export/corpus.py | setup
	@echo "[demo] building the demo model into $(DEMO_MODEL) (seeded weights, locally trained tokenizer)"
	@$(PY) -m export demo --out $(DEMO_MODEL)

demo-model: setup $(DEMO_MODEL)/config.json  ## build the demo model if absent

$(ONNX_DEMO)/manifest.json: $(DEMO_MODEL)/config.json export/onnx_export.py export/validation.py lepton/models/llama.py | setup
	@$(PY) -m export onnx --model $(DEMO_MODEL) --out $(ONNX_DEMO)

export: setup $(ONNX_DEMO)/manifest.json  ## export the demo model to a paged-KV ONNX graph, validated against PyTorch

bench-runners: setup $(DEMO_MODEL)/config.json  ## ONNX Runtime vs PyTorch decode-step latency (BENCH_ARGS=...)
	@$(PY) -m export.bench_runners $(BENCH_ARGS)

serve: setup  ## serve MODEL (default: the demo model) with RUNNER=torch|onnxruntime on HOST:HTTP_PORT/GRPC_PORT/METRICS_PORT
	@if [ "$(MODEL)" = "$(DEMO_MODEL)" ]; then $(MAKE) --no-print-directory $(DEMO_MODEL)/config.json; fi
	@if [ "$(MODEL)" = "$(ONNX_DEMO)" ]; then $(MAKE) --no-print-directory $(ONNX_DEMO)/manifest.json; fi
	@$(PY) -m lepton.server --model $(MODEL) --param runner=$(RUNNER) --host $(HOST) --http-port $(HTTP_PORT) \
		--grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: setup $(DEMO_MODEL)/config.json  ## unit and end-to-end tests (real tritonserver on loopback)
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup  ## unit tests only (no server, no model)
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:  ## remove generated artifacts (build/), keep the venv
	rm -rf build
