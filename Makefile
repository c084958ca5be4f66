# Set-up and the two everyday commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit test-integration lint clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash start_clip.sh

# The whole suite (CI); the slowest tests are listed at the end.
test: setup lint
	$(PY) -m pytest -q --durations=15

# The fast part (about 100 seconds on 2 cores): everything not marked `integration` (tests that start processes)
# or `slow`; test-integration runs those.
test-unit: setup
	$(PY) -m pytest -q -m "not integration and not slow"

test-integration: setup
	$(PY) -m pytest -q -m "integration or slow"

lint: setup
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf demo_data output/demo_stage1_*
