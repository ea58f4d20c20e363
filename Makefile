# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
# torch==2.13.0 is installed before the package so pip takes the local CPU wheel instead of
# several GB of CUDA wheels; on a GPU machine see README "GPU install".
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[test]"
	touch $@

demo: setup
	$(BIN)/slidescore demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed and memory against MONAI (docs/benchmarks.md); BENCH_ARGS e.g. "--size 2048 --skip-memory".
bench: setup $(VENV)/.bench-installed
	$(BIN)/python benchmarks/speed.py $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml
	$(BIN)/pip install -e ".[bench]"
	touch $@

lint: setup
	$(BIN)/ruff check slidescore jobs tests
	$(BIN)/lint-imports
	$(BIN)/mypy slidescore

clean:
	rm -rf $(VENV) demo-output .pytest_cache
