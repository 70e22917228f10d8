# lightning-dq: every target is one command; `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PY := .venv/bin/python
CLI := .venv/bin/lightning-dq
GPUS ?= 1
ARGS ?=
DATA_ROOT ?= data/
DDP := $(if $(filter-out 0 1,$(GPUS)),--config configs/ddp.yaml --trainer.devices=$(GPUS),)

.PHONY: help install test test-all lint

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'

install:  ## create .venv and install lightning-dq with its dev extras (from nothing)
	python3 -m venv .venv && $(PY) -m pip install --upgrade pip && $(PY) -m pip install -e '.[dev]'

test:  ## run the fast test suite (CPU; no slow or gpu tests)
	$(PY) -m pytest -m "not slow and not gpu" -n 2 $(ARGS)

test-all:  ## run every CPU test, slow ones included
	$(PY) -m pytest -m "not gpu" -n 2 $(ARGS)

lint:  ## ruff check
	$(PY) -m ruff check lightning_dq tests benchmarks experiments
