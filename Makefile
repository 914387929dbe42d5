# seqserve: `make serve` runs the server on the bundled store; `make test` installs and tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_DIR := tests/node
# Test processes (pytest-xdist): 2 fits a 2-core machine; PYTEST_WORKERS=0 runs the tests in one.
PYTEST_WORKERS ?= 2

.PHONY: install system-deps node-deps serve test lint typecheck protos fmt bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Prometheus (promtool + a real server for the integration test) and docker-compose (to
# validate the compose file), from Debian's packages.
system-deps:
	bash .ci/install-system-deps.sh

# The Node.js gRPC client used to check the .proto files work from another language.
node-deps: $(NODE_DIR)/node_modules/.package-lock.json

$(NODE_DIR)/node_modules/.package-lock.json: $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error

# Flags for the server: make serve ARGS="--port 50052 --metrics-port 9465" (SEQSERVE_* env works too).
serve: $(STAMP)
	$(VENV)/bin/seqserve serve $(ARGS)

test: $(STAMP) system-deps node-deps
	$(VENV)/bin/ruff check service tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -n $(PYTEST_WORKERS) ; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests benchmarks
	$(VENV)/bin/ruff format --check service tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

protos: $(STAMP)
	$(PY) -m service.codegen

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(NODE_DIR)/node_modules
