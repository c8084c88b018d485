# Front-door commands (see README.md). Each installs what it needs on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v java >/dev/null || { echo "installing Java 17 (Deephaven needs a JVM)"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[local,test]'
	touch $@

# Runs notebooks/quickstart.ipynb end to end, headless; the executed copy lands in build/.
demo: setup
	$(VENV)/bin/jupyter nbconvert --to notebook --execute notebooks/quickstart.ipynb \
	  --output-dir build --output quickstart.executed.ipynb
	@echo "executed notebook: build/quickstart.executed.ipynb"

test: setup
	$(PY) -m pytest -ra

bench: setup
	$(PY) bench/bench_local.py

clean:
	rm -rf build .pytest_cache
