# Two commands matter on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

# The stamp depends on the Makefile too, so a changed install recipe reaches existing venvs.
# llama-cpp-cffi is llama.cpp's prebuilt CPU library, the peer of benchmarks/generate.py and
# tests/test_llamacpp.py; its Python layer pins transformers<5, which we never import: hence --no-deps
# (its one runtime need, cffi, is in the test extra). keras-hub, the peer of tests/test_keras.py, requires
# tensorflow-text and with it TensorFlow, neither of which it needs on the JAX backend: --no-deps too (its
# runtime needs are in the test extra).
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llama-cpp-cffi==0.4.42
	$(BIN)/pip install -q --no-deps keras-hub==0.32.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m gemmax.demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	cd src && ../$(BIN)/lint-imports --config ../pyproject.toml
	$(BIN)/python -m pytest -n 2 --dist loadfile -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	cd src && ../$(BIN)/lint-imports --config ../pyproject.toml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
