# upsertflow — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Options of `make dev`, e.g. DEV_ARGS="--workers 2 --apis 2".
DEV_ARGS ?=
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev and test extras

dev: $(STAMP) ## Run the whole stack (PostgreSQL, Temporal, enrichment, worker, API) on embedded defaults
	$(BIN)/python -m devstack $(DEV_ARGS)

test: $(STAMP) ## Run the whole test suite offline on the embedded components
	$(BIN)/python -m pytest

record-histories: $(STAMP) ## Record workflow histories of real runs for the replay tests (tests/histories)
	$(BIN)/python -m tests.histories.record

bench: $(STAMP) ## Benchmark upsertflow against a baseline measured in the same run (bench/RESULTS.md)
	$(BIN)/python -m bench.upserts

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: $(STAMP) ## Format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-data: ## Delete the embedded servers' data (.data/)
	rm -rf .data

.PHONY: help install dev test record-histories bench lint format clean-data
