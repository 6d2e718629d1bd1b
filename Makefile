PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-all demo bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m ''

demo:
	mkdir -p out
	$(BIN)/prunetool shrink samples/evci_cnn.pt --arch samples.nets:EvciCNN \
		--data samples/mnist_subset.npz --ratio 0.6 \
		--out out/evci_cnn.shrunk.safetensors --json out/evci_cnn.report.json

# Benchmarks behind docs/BENCHMARKS.md (Torch-Pruning is a benchmark-only dependency). Two more need
# time or data: `python -m benchmarks.coverage` (docs/COVERAGE.md, ~30 min) and
# `python -m benchmarks.recover --mnist-root ROOT` (full MNIST, see samples/README.md); `python -m benchmarks.cuda`
# needs a CUDA GPU (the same CLI jobs with --device cuda and cpu, ~9 min on an H100).
bench:
	$(BIN)/pip install -e '.[bench]'
	$(BIN)/python -m benchmarks.shrink_accuracy --out docs/BENCHMARKS.md
	$(BIN)/python -m benchmarks.lowrank --out docs/BENCHMARKS.md
	$(BIN)/python -m benchmarks.latency --out docs/BENCHMARKS.md
	$(BIN)/python -m benchmarks.transformers --out docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) build *.egg-info
