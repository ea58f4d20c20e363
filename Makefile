# Two entry points for a fresh machine: `make demo` and `make test` (each sets up .venv first).
# Every install goes through constraints.txt, the lock of the versions CI passed with (Python 3.11,
# Linux x86_64, CPU torch 2.13.0 from the local wheel); `make lock` refreshes it. torch==2.13.0 is
# installed before the package so pip takes the local CPU wheel instead of several GB of CUDA
# wheels; on a GPU machine see README "GPU install".
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
PIP := $(BIN)/pip install --constraint $(LOCK)

.PHONY: setup demo test lint bench view lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip==$$(sed -n 's/^pip==//p' $(LOCK))"
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[test]"
	$(BIN)/pip check
	touch $@

demo: setup
	$(BIN)/slidescore demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Speed and memory against MONAI (docs/benchmarks.md); BENCH_ARGS e.g. "--size 2048 --skip-memory".
bench: setup $(VENV)/.bench-installed
	$(BIN)/python benchmarks/speed.py $(BENCH_ARGS)

$(VENV)/.bench-installed: pyproject.toml $(LOCK)
	$(PIP) -e ".[bench]"
	touch $@

# napari + Qt for `slidescore view` (optional; tests/report/test_viewer_napari.py runs where it is installed)
view: setup
	$(PIP) -e ".[view]"

# Refresh the lock: resolve every extra afresh in a throwaway venv and freeze it (review the diff,
# run `make clean test`, commit constraints.txt with the code that needs it).
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install --upgrade pip
	.lock-venv/bin/pip install "torch==2.13.0"
	.lock-venv/bin/pip install -e ".[test,bench,view]"
	( echo "# The lock: exact versions for Python 3.11 on Linux x86_64 with the CPU torch 2.13.0 wheel."; \
	  echo "# Used as pip --constraint by make setup (and so by .ci/run) and by the Dockerfile."; \
	  echo "# Refresh with: make lock  (then make clean test). GPU: install the CUDA torch 2.13.0 first (README)."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v '^slidescore' | sed 's/+cpu$$//' ) > $(LOCK)
	rm -rf .lock-venv

lint: setup
	$(BIN)/ruff check slidescore jobs tests
	$(BIN)/lint-imports
	$(BIN)/mypy slidescore

clean:
	rm -rf $(VENV) demo-output .pytest_cache
