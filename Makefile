# Quick start: `make demo` (runs linquant on the bundled all-MiniLM-L6-v2), `make test`.
# Each target creates .venv and installs what it needs; torch is pinned to the CPU build on
# purpose so pip never pulls a multi-GB CUDA wheel (users with GPUs keep their own torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo sweep test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/linquant demo

sweep: $(STAMP)
	$(BIN)/linquant sweep

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps torchao
	$(BIN)/python benchmarks/bench_quantize.py
	cd benchmarks && ../$(BIN)/python bench_linear.py
	$(BIN)/python benchmarks/bench_model.py
	cd benchmarks && ../$(BIN)/python bench_w8a8_crossover.py
	cd benchmarks && ../$(BIN)/python bench_w8a16_crossover.py
	cd benchmarks && ../$(BIN)/python bench_avx2_crossover.py
	cd benchmarks && ../$(BIN)/python bench_peak.py
	$(BIN)/python benchmarks/bench_dequant.py
	$(BIN)/python benchmarks/bench_plans.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
