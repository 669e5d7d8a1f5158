# screenline: `make demo` and `make test` work on a fresh machine (they create .venv and install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# Prefect, offline and project-local: no analytics, a patient ephemeral server, nothing written to ~/.prefect.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# `make serve`: the port, the nightly schedule's time zone (IANA name) and the inbox folder sites drop shards in.
SCREENLINE_PORT ?= 4200
export SCREENLINE_TIMEZONE ?= UTC
export SCREENLINE_INBOX ?= $(CURDIR)/inbox

.PHONY: install demo test test-gpu bench bench-quick serve stop clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,dask,optimize]'
	@touch $@

install: $(VENV)/.installed

demo: install  ## samples → ingest → optimize → nightly (ingest the inbox, screen, audit) on a generated sample set
	$(VENV)/bin/screenline demo

test: install  ## the whole test suite (tiny lakes; minutes, not hours)
	$(PY) -m pytest

test-gpu: install  ## the GPU tests, on a host with an NVIDIA GPU and the `gpu` extra (see README); elsewhere they skip
	$(PY) -m pytest -m gpu -rs tests/models/test_tensorrt.py tests/flows/test_optimize.py

bench: install  ## every engine side by side with the seed baseline (uses ./lake's promoted model: `make demo` first), then cost in lake size
	$(PY) -m benchmarks.bench
	$(PY) -m benchmarks.lake_scale --out benchmarks/results/$$(date -u +%Y-%m-%d)-lake-scale.json

bench-quick: install  ## the benchmark harness as a smoke run (seconds; asserts nothing about speed); make test runs it
	$(PY) -m benchmarks.bench --quick --out build/bench-quick

serve: install  ## a local Prefect server on 127.0.0.1:$(SCREENLINE_PORT), the process pool, the deployments, a worker
	$(PY) -m deployments.serve start --port $(SCREENLINE_PORT)

stop:  ## stop what `make serve` started (by the PIDs it recorded)
	@test -x $(PY) && $(PY) -m deployments.serve stop || echo "nothing to stop (no .venv)"

clean:  ## remove generated data (the lake, samples, Prefect's local state); keeps .venv
	rm -rf lake build .prefect .pytest_cache
