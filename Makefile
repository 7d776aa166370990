# Quick start: `make demo` (runs linquant on the bundled all-MiniLM-L6-v2), `make test`.
# Each target creates .venv and installs what it needs; torch is pinned to the CPU build on
# purpose so pip never pulls a multi-GB CUDA wheel (users with GPUs keep their own torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo sweep test test-oldest test-triton-versions lint bench clean

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

# The oldest releases linquant supports: PyTorch 2.4 (from PyPI, a CUDA build of about 5 GB,
# with the Triton 3.0 it pins, which the kernels do not use) and the libraries that still
# support it. Not part of `make test`: it downloads several GB.
OLD_VENV ?= .venv-oldest
OLD_PINS := torch==2.4.1 "transformers<5" "sentence-transformers<5" "numpy<2.3"
test-oldest:
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	printf 'torch==2.4.1\n' > $(OLD_VENV)/constraints.txt
	$(OLD_VENV)/bin/python -m pip install -q $(OLD_PINS)
	$(OLD_VENV)/bin/python -m pip install -q -c $(OLD_VENV)/constraints.txt $(OLD_PINS) -e ".[test]"
	$(OLD_VENV)/bin/python -m pytest -q -p no:cacheprovider

# The Triton kernel tests in the interpreter of each Triton release from the oldest supported
# (3.2), beside the project's torch, with numpy 2.2 (numpy 2.4 breaks the interpreters of Triton
# 3.6 and older).
TRITON_VERSIONS ?= 3.2.0 3.3.1 3.4.0 3.5.1 3.6.0
test-triton-versions: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target .compat/numpy "numpy<2.3"
	for v in $(TRITON_VERSIONS); do \
	  $(BIN)/python -m pip install -q --no-deps --target .compat/triton-$$v triton==$$v && \
	  echo "== triton $$v" && PYTHONPATH=.compat/triton-$$v:.compat/numpy \
	    $(BIN)/python -m pytest -q -p no:cacheprovider -m triton tests/kernels || exit 1; \
	done

clean:
	rm -rf $(VENV) $(OLD_VENV) .compat build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
