# Two entry points: `make demo` and `make test`. Both build .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test assets clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m deltatune.assets minilm-l6 smollm2-135m rotten-tomatoes

demo: assets
	$(PY) examples/quickstart.py

test: assets
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info
