# shopserve: the two commands of the README are `make demo` and `make test`.
# Triton's Python backend stub embeds the system's libpython3.11 and takes its standard library from
# this environment: make the environment from that same interpreter, or `ssl` (and with it the Redis
# client) cannot load inside the stub (README, Installing pieces).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3)
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
REPOSITORY ?= stores/homedepot
GRPC_PORT ?= 8001
export DATA_DIR

.PHONY: install store serve demo test test-fast lint bench bench-smoke clean-store instacart-store serve-instacart

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

# Serve repository $(1) (serve options $(3)) in the background, run the shell commands $(2)
# against it, stop it and wait until it has exited (the next server takes the same ports).
define with_server
	@$(BIN)/shopserve serve --model-repository $(1) --grpc-port $(GRPC_PORT) $(3) \
		--log-file .triton/demo-server.log > .triton-demo.out 2>&1 & echo $$! > .triton-demo.pid; \
	trap 'kill $$(cat .triton-demo.pid) 2>/dev/null; wait $$(cat .triton-demo.pid); \
		rm -f .triton-demo.pid .triton-demo.out' EXIT; \
	for i in $$(seq 1 240); do grep -q ready .triton-demo.out 2>/dev/null && break; sleep 0.5; done; \
	cat .triton-demo.out; $(2)
endef
QUERY := $(BIN)/shopserve search --url 127.0.0.1:$(GRPC_PORT)

# The user-id secret is made at first use and never committed (.secrets/ is git-ignored).
USER_KEY ?= .secrets/user.key

# make demo: install, build two small shops cut from the real data (about 12 minutes in all on a clean
# clone of a 2-core machine; the full stores are make store and make instacart-store), serve each,
# answer real queries through the client, stop. What the cuts serve: docs/performance.md#the-demo.
DEMO ?= stores/demo
DEMO_QUERIES ?= 1000
DEMO_PRODUCTS ?= 10000
DEMO_FINETUNE_MINUTES ?= 1
DEMO_USERS ?= 200
DEMO_EXTRA_PRODUCTS ?= 2000

$(DEMO)/homedepot/manifest.json: | install
	$(BIN)/python -m shopserve.export cut --data $(DATA_DIR)/homedepot --queries $(DEMO_QUERIES) \
		--products $(DEMO_PRODUCTS) --output $(DEMO)/homedepot-data
	$(BIN)/python -m shopserve.export build --catalogue $(DEMO)/homedepot-data/items.csv \
		--judgments $(DEMO)/homedepot-data/judged.csv --finetune-minutes $(DEMO_FINETUNE_MINUTES) \
		--repository $(DEMO)/homedepot

$(DEMO)/instacart/manifest.json: $(DEMO)/homedepot/manifest.json | $(USER_KEY)
	$(BIN)/python -m shopserve.export instacart --data $(DATA_DIR)/instacart --users $(DEMO_USERS) \
		--extra-products $(DEMO_EXTRA_PRODUCTS) --output $(DEMO)/instacart-data
	SHOPSERVE_USER_KEY_FILE=$(USER_KEY) $(BIN)/python -m shopserve.export build \
		--catalogue $(DEMO)/instacart-data/items.csv --events $(DEMO)/instacart-data/events.csv \
		--ranker $(DEMO)/homedepot/ranker/1/model.onnx --repository $(DEMO)/instacart

demo: $(DEMO)/homedepot/manifest.json $(DEMO)/instacart/manifest.json
	$(call with_server,$(DEMO)/homedepot,\
	for q in "cordless drill" "angle bracket" "rain shower head" "deck over"; do \
		echo; echo "== $$q"; $(QUERY) "$$q" -k 5 || exit 1; \
	done)
	$(call with_server,$(DEMO)/instacart,\
	echo; echo "== recommend for shopper 1"; \
	$(BIN)/shopserve recommend 1 -k 5 --url 127.0.0.1:$(GRPC_PORT) || exit 1; \
	echo; echo "== yogurt (anonymous)"; $(QUERY) yogurt -k 5 || exit 1; \
	echo; echo "== yogurt (for shopper 1)"; $(QUERY) yogurt -k 5 --user 1 || exit 1,\
	--user-key-file $(USER_KEY) --work-dir $(DEMO)/instacart-work)

# Personalisation: Instacart through the generic formats, with the Home Depot store's ranker.
INSTACART_DATA ?= stores/instacart-data
INSTACART_STORE ?= stores/instacart

$(USER_KEY): | install
	$(BIN)/shopserve keys create $@

instacart-store: $(INSTACART_STORE)/manifest.json

$(INSTACART_STORE)/manifest.json: $(REPOSITORY)/manifest.json | $(USER_KEY)
	$(BIN)/python -m shopserve.export instacart --data $(DATA_DIR)/instacart --output $(INSTACART_DATA)
	SHOPSERVE_USER_KEY_FILE=$(USER_KEY) $(BIN)/python -m shopserve.export build \
		--catalogue $(INSTACART_DATA)/items.csv --events $(INSTACART_DATA)/events.csv \
		--ranker $(REPOSITORY)/ranker/1/model.onnx --repository $(INSTACART_STORE)

# The real-time gain of make bench needs a store without each shopper's last basket.
INSTACART_HELD_OUT_STORE ?= stores/instacart-held-out

$(INSTACART_HELD_OUT_STORE)/manifest.json: $(INSTACART_STORE)/manifest.json
	$(BIN)/python -m benchmarks held-out-events --data $(INSTACART_DATA)
	SHOPSERVE_USER_KEY_FILE=$(USER_KEY) $(BIN)/python -m shopserve.export build \
		--catalogue $(INSTACART_DATA)/items.csv --events $(INSTACART_DATA)/events-before-last.csv \
		--ranker $(REPOSITORY)/ranker/1/model.onnx --repository $(INSTACART_HELD_OUT_STORE)

serve-instacart: instacart-store
	$(BIN)/shopserve serve --model-repository $(INSTACART_STORE) --user-key-file $(USER_KEY) \
		--grpc-port $(GRPC_PORT) --work-dir $(INSTACART_STORE)-work

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Performance (benchmarks/README.md): the full harness, about 30 minutes on 2 cores, writes
# benchmarks/results/. It takes /tmp/shopserve-cpu.lock itself around each measurement: do not wrap it
# in flock. bench-smoke runs seconds of everything into benchmarks/work/smoke/.
bench: store instacart-store $(INSTACART_HELD_OUT_STORE)/manifest.json
	$(BIN)/python -m benchmarks run
	$(BIN)/python -m benchmarks overload
	SHOPSERVE_USER_KEY_FILE=$(USER_KEY) $(BIN)/python -m benchmarks personal \
		--repository $(INSTACART_STORE) --held-out-repository $(INSTACART_HELD_OUT_STORE) \
		--data $(INSTACART_DATA)

bench-smoke: store
	$(BIN)/python -m benchmarks smoke

clean-store:
	rm -rf $(REPOSITORY) $(INSTACART_STORE) $(INSTACART_HELD_OUT_STORE) $(INSTACART_DATA) $(DEMO)
