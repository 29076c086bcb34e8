# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck bench bench-peers soak install services clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/conveyor serve --host $(HOST) --port $(PORT)

# The tests start their own PostgreSQL, Redis and RabbitMQ servers (free loopback ports,
# temporary folders) from Debian's packages, and drive Debian's chromium (through Playwright)
# for the dashboard; all installed here when missing.
services:
	@command -v redis-server >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
	  && test -x /usr/lib/rabbitmq/bin/rabbitmq-server && command -v chromium >/dev/null \
	|| $(SUDO) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq --no-install-recommends redis-server postgresql rabbitmq-server \
	   chromium'

test: $(STAMP) services
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.images
	$(PY) -m benchmarks.csvstats
	$(PY) -m benchmarks.celery_engine
	$(PY) -m benchmarks.ingest
	$(PY) -m benchmarks.schedules
	$(PY) -m benchmarks.batches
	$(PY) -m benchmarks.email
	$(PY) -m benchmarks.retention
	$(PY) -m benchmarks.metrics

# Conveyor against Huey, Celery and DBOS (their packages from benchmarks/requirements-peers.txt)
bench-peers: $(STAMP) services
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(PY) -m pip install --quiet -r benchmarks/requirements-peers.txt
	$(PY) -m benchmarks.peers $(PEERS_ARGS)

# the fault suite for minutes (the embedded engine): prints what it counted
soak: $(STAMP)
	$(PY) -m benchmarks.soak --minutes $(or $(MINUTES),3)

clean:
	rm -rf $(VENV) var
