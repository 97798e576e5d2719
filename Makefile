# Set-up for a fresh clone: `make sample` and `make test` each create .venv on first use
# (torch 2.13.0 first, so pip takes the CPU build on disk, then diffreg with its test extra, then
# the separately packaged plugin plugins/diffreg-solvers, installed like any third-party plugin).
PYTHON ?= python3
# where torch comes from; empty: pip's own settings (on the CI machines, a local CPU wheel).
# Elsewhere, for the CPU build: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffreg-installed

.PHONY: sample test lint bench clean

$(STAMP): pyproject.toml plugins/diffreg-solvers/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet ./plugins/diffreg-solvers
	touch $(STAMP)

sample: $(STAMP)
	$(BIN)/diffreg sample --output grid.png --npz samples.npz

# one torch thread per test process unless told otherwise: the suite's tensors are small, and on a
# shared 2-core machine extra threads only contend (README: "On a shared machine")
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff mypy
	$(BIN)/ruff check diffreg tests benchmarks scripts plugins
	$(BIN)/mypy diffreg

clean:
	rm -rf $(VENV) grid.png samples.npz
