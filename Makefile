# Palisade — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.palisade-installed
export PALISADE_HOME ?= $(CURDIR)/var

.DEFAULT_GOAL := help
.PHONY: help setup system-deps model run test check lint typecheck bench bench-guidellm clean
# Debian tools the image code runs (squashfs, GPT, GRUB's environment block, dm-verity format).
SYSTEM_PACKAGES := squashfs-tools fdisk grub-common cryptsetup-bin
SYSTEM_COMMANDS := mksquashfs unsquashfs sfdisk grub-editenv veritysetup

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

system-deps: ## Install the Debian packages Palisade's image tools use (apt-get, as root)
	@for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(SYSTEM_PACKAGES); \
	fi

setup: $(STAMP) system-deps ## Create .venv and install Palisade with its dev tools

model: $(STAMP) ## Fetch the default model (SmolLM2-135M-Instruct) into $PALISADE_HOME/models
	$(BIN)/palisade models fetch-default

run: model ## Start a local fleet (router + appliances in eu-west and us-east), print URL, key, curl
	$(BIN)/palisade fleet up

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over every package and the tests
	$(BIN)/mypy

check: lint typecheck ## Lint and type-check

test: model system-deps check ## Install everything and run lint, types and the whole test suite
	$(BIN)/pytest

bench: model ## Run the benchmarks (tables on stdout, JSON under var/bench/)
	$(BIN)/python -m tests.bench

bench-guidellm: model ## guidellm's sweep against the appliance and the router (own venv)
	$(BIN)/python -m tests.bench --only guidellm

clean: ## Remove the virtual env and caches (keeps var/)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
