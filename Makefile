# Every target creates and reuses .venv by itself; `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO := data/demo
DEMO_PATIENTS ?= 250

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv browser demo readme-numbers ui doctor test test-fast bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# Each step is timed into $(DEMO)/timings.json; the run's counts and timings are printed at the end, and
# `make readme-numbers` writes them into README.md's demo-numbers block (never typed by hand).
NUMBERS := $(BIN)/python scripts/readme_numbers.py

demo: $(STAMP)
	@if test -f $(DEMO)/cohort/cohort.yaml; then echo "$(DEMO)/cohort exists: not synthesised again (make clean starts over)"; \
	else $(NUMBERS) timed $(DEMO)/timings.json synth -- $(BIN)/fusion synth --out $(DEMO)/cohort --patients $(DEMO_PATIENTS); fi
	$(NUMBERS) timed $(DEMO)/timings.json pipeline -- $(BIN)/fusion pipeline configs/demo.yaml
	@$(NUMBERS) show $(DEMO)/run --timings $(DEMO)/timings.json

# For the README's numbers, measure a first run: `make clean demo readme-numbers`.
readme-numbers: $(STAMP)
	$(NUMBERS) update $(DEMO)/run --timings $(DEMO)/timings.json --readme README.md

# Prefect's UI on http://127.0.0.1:4200 (the runs `make demo` recorded in .prefect/) and the report files
# its artifacts link to on :4201; Ctrl-C stops both.
ui: $(STAMP)
	$(BIN)/fusion ui

doctor: $(STAMP)
	$(BIN)/fusion doctor configs/demo.yaml

# The report tests render pages in Debian's Chromium; install it when it is missing.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

lint: $(STAMP)
	$(BIN)/ruff check fusion flows tests benchmarks scripts

clean:
	rm -rf $(DEMO) .prefect .pytest_cache
