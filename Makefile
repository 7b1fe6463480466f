# shopserve: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
REPOSITORY ?= model_repository
GRPC_PORT ?= 8001
export DATA_DIR

.PHONY: install store serve demo test test-fast lint bench bench-smoke clean-store

install: $(VENV)/.installed

# torch==2.13.0 first: a local CPU wheel here; pip would otherwise fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

store: $(REPOSITORY)/manifest.json

$(REPOSITORY)/manifest.json: | install
	$(BIN)/python -m shopserve.export build --data $(DATA_DIR)/homedepot --repository $(REPOSITORY)

serve: store
	$(BIN)/shopserve serve --model-repository $(REPOSITORY) --grpc-port $(GRPC_PORT)

# Install, build the store, serve it, answer a few real queries through the client, stop.
demo: store
	@$(BIN)/shopserve serve --model-repository $(REPOSITORY) --grpc-port $(GRPC_PORT) \
		--log-file .triton/demo-server.log > .triton-demo.out 2>&1 & echo $$! > .triton-demo.pid; \
	trap 'kill $$(cat .triton-demo.pid) 2>/dev/null; rm -f .triton-demo.pid .triton-demo.out' EXIT; \
	for i in $$(seq 1 240); do grep -q ready .triton-demo.out 2>/dev/null && break; sleep 0.5; done; \
	cat .triton-demo.out; \
	for q in "cordless drill" "angle bracket" "rain shower head" "deck over"; do \
		echo; echo "== $$q"; $(BIN)/shopserve search "$$q" -k 5 --url 127.0.0.1:$(GRPC_PORT) || exit 1; \
	done

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Performance (benchmarks/README.md): the full harness, about 30 minutes on 2 cores, writes
# benchmarks/results/. It takes /tmp/shopserve-cpu.lock itself around each measurement: do not wrap it
# in flock. bench-smoke runs seconds of everything into benchmarks/work/smoke/.
bench: store
	$(BIN)/python -m benchmarks run

bench-smoke: store
	$(BIN)/python -m benchmarks smoke

clean-store:
	git clean -fdX $(REPOSITORY)
