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
# The chat page's browser test drives Debian's Chromium through Playwright; Playwright is never let to
# download a browser of its own. Installing chromium needs root (as in CI): without it the recipe stops here.
CHROMIUM := /usr/bin/chromium
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install -q -e '.[test]'
	test -x $(CHROMIUM) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
		|| { echo "error: could not install Debian's chromium (apt-get install chromium, as root);" \
		"tests/test_chat_page.py needs $(CHROMIUM)" >&2; exit 1; }
	$(CHROMIUM) --version
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
