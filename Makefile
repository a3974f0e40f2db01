# Each target works on a fresh machine: it creates .venv and installs what it needs from setup.py.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	# libtpu, so tests compile train steps for TPU topologies on this CPU: jax[tpu] pinned to the installed jax, so
	# pip picks the matching libtpu and never moves jax.
	$(BIN)/pip install --quiet "jax[tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cwm_jax.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/compile_time.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/convert.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info
