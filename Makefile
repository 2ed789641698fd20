# Two commands do all the set-up on a machine with only Python (>= 3.11, with its venv module) and make:
#   make run    serve the API and a write-through worker on http://127.0.0.1:8000 with a demo event
#   make test   the whole test suite against real Redis and PostgreSQL (pass pytest options: ARGS='-k foo')
# Both create .venv and install the project into it (again only when pyproject.toml changed).
# Servers: REDIS_URL / DATABASE_URL if set, else local defaults if they answer, else embedded ones in
# .boxoffice/ (service/servers.py; BOXOFFICE_EMBEDDED=1 forces those).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test bench lint format clean

help:
	@echo "make run     serve the API + a worker with a demo event (Ctrl-C stops everything)"
	@echo "make test    run the test suite (ARGS='-k hold -x' passes options to pytest)"
	@echo "make bench   the bounded loopback benchmark (boxoffice bench; ARGS='--runs 3' passes options)"
	@echo "make lint    ruff check and ruff format --check"
	@echo "make format  ruff format and the safe ruff fixes"
	@echo "make clean   remove .venv and the embedded servers' data (.boxoffice/)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "boxoffice needs Python >= 3.11; run: make PYTHON=python3.11 ...")'
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "'$(PYTHON) -m venv' failed: install your Python's venv module (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }

# Reinstall only when pyproject.toml is newer than the stamp (or the venv is new).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,load]'
	@touch $@

install: $(STAMP)

run: $(STAMP)
	$(BIN)/boxoffice dev

test: $(STAMP)
	$(BIN)/pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/boxoffice bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .boxoffice
