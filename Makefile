# Set-up and the two everyday commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint clean-demo

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash start_clip.sh

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf demo_data output/demo_stage1_*
