# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# the sim extra (Ray) only for simulations/simulate.py and its test; the node and
	# the agent never import it
	$(VENV)/bin/pip install -q -e '.[dev,sim]'
	# tests/audit/test_console.py drives Debian's chromium through Playwright (no browser download)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	touch $(STAMP)

.PHONY: setup demo test test-slow lint
setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedraft demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/pytest -q

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow
