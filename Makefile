# tidings: the two commands a newcomer needs are `make run` and `make test`.
VENV   := .venv
BIN    := $(VENV)/bin
PYTHON ?= python3

.PHONY: install run test lint bench loadtest install-systemd clean

# The Python client (clients/python) goes in too: our tests use it, as anyone scripting would.
$(BIN)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -e clients/python
	touch $@

install: $(BIN)/.installed      ## also the JavaScript client's test tools (when node is there)
	if command -v node >/dev/null 2>&1; then cd clients/js && npm ci --no-audit --no-fund --loglevel=error; fi

run: $(BIN)/.installed          ## install into .venv, then start one hub and N workers
	$(BIN)/tidings run --demo

test: $(BIN)/.installed         ## lint, then every test (real processes on loopback)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed        ## performance suite: loadtest/RESULTS.md and plots
	$(BIN)/python -m loadtest.bench all

loadtest: $(BIN)/.installed     ## Locust capacity run against a tidings it starts itself
	$(BIN)/python -m loadtest

install-systemd:                ## as root: user, units, sysctl (see README "Run in production")
	sh systemd/install.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache
