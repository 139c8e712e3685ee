# The two commands a newcomer needs:
#   make run    build and run the service (starts the local ClickHouse when
#               ADTRACK_CLICKHOUSE_URL is not set; installs it on first use)
#   make test   install what the tests need, then run every test
# Everything else here is for development.

SHELL := /bin/bash
CARGO ?= cargo
VENV  := .venv

.PHONY: run test test-python deps deps-engine lint fmt bench-ingest bench-analytics clean-data

# Without ADTRACK_ADMIN_KEY, a bootstrap admin key is made once and kept in data/admin-key;
# `scripts/dev-key` uses it to create a tenant and an API key.
run: deps-engine
	@mkdir -p data && [ -s data/admin-key ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > data/admin-key
	@echo "bootstrap admin key: $${ADTRACK_ADMIN_KEY:-$$(cat data/admin-key)} (create an API key: scripts/dev-key)"
	ADTRACK_ADMIN_KEY="$${ADTRACK_ADMIN_KEY:-$$(cat data/admin-key)}" $(CARGO) run --release --bin adtrack

test: deps
	$(CARGO) test --all-targets
	$(MAKE) test-python

test-python: deps
	scripts/local-clickhouse --pytest -q
	@if [ -d tests/infra ]; then $(VENV)/bin/python -m pip install -q -r tests/infra/requirements.txt && $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/infra; fi

# System packages, the local ClickHouse's virtualenv and newman (idempotent, quick when present).
deps:
	@scripts/install-deps

# Only the local ClickHouse's virtualenv (what `make run` needs).
deps-engine:
	@scripts/local-clickhouse --install-only

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

bench-ingest: deps
	benches/ingest.sh

bench-analytics: deps
	benches/analytics.sh

clean-data:
	rm -rf data
