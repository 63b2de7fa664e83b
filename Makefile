# chat-proxy: `make demo` installs and starts the demo; `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CACHE  ?= $(HOME)/.cache/chat-proxy

.PHONY: install demo test test-quick e2e-deps lint bench bench-fleet clean

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

# session affinity on real engines: builds llama.cpp's llama-server once (cached in
# $(CACHE)), then the same chat trace through the proxy per balance mode
bench-fleet: install
	LLAMA_SERVER_BIN="$$(bash scripts/install-llama-cpp-server.sh)" && \
	  timeout 900 $(BIN)/python bench/fleet/engines.py --server "$$LLAMA_SERVER_BIN" $(BENCH_FLEET_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
