# chat-proxy: `make demo` installs and starts the demo; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CACHE  ?= $(HOME)/.cache/chat-proxy

.PHONY: install demo test test-quick e2e-deps lint bench clean

$(BIN)/chat-proxy: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/chat-proxy

demo: install
	$(BIN)/chat-proxy serve --config config/demo.yaml

# what the end-to-end tests need: the llama.cpp server (built once, cached in
# $(CACHE)) and the OpenAI Node SDK
e2e-deps: install
	bash scripts/install-llama-server.sh
	cd tests/e2e/node && npm install --no-audit --no-fund --silent

test: install e2e-deps
	$(BIN)/pytest

test-quick: install
	$(BIN)/pytest tests --ignore=tests/e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	bash bench/run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
